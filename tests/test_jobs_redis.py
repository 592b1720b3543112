"""JOB_BACKEND=redis on a real redis-server: instances share jobs, a killed worker's job is taken
over, Redis unreachable at start-up or lost while serving."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.common import server_process
from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.redis_server import RedisServer
from tests.scripts import free_ports, wait_for
from tests.server import ServerThread
from tests.test_jobs import chunks, follow


def redis_settings(redis: RedisServer, queue: str, **values: object) -> dict[str, object]:
    return {"job_backend": "redis", "redis_url": redis.url, "redis_job_queue": queue, **values}


def fake_instance(redis: RedisServer, queue: str, **values: object) -> tuple[ServerThread, FakeBackend]:
    backend = FakeBackend(ModelKind.BI_ENCODER)
    settings = make_settings(batch_size=8, **redis_settings(redis, queue, **values))
    return ServerThread(create_app(settings, backend=backend)), backend


def embed_job(client: httpx.Client, batch_id: str, count: int) -> httpx.Response:
    return client.post(
        "/v1/jobs", json={"type": "embed", "input": {"batch_id": batch_id, "chunks": chunks(count)}}
    )


def occupy_worker(client: httpx.Client, backend: FakeBackend, batch_id: str) -> httpx.Response:
    """Submit a job and wait until its first batch is held in the model: this worker is busy."""
    backend.gate.clear()
    backend.batch_started.clear()
    job = embed_job(client, batch_id, 8)
    assert backend.batch_started.wait(30)
    return job


@pytest.fixture
def queue() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def two_instances(redis_server: RedisServer, queue: str) -> Iterator[tuple[ServerThread, ServerThread]]:
    first, _ = fake_instance(redis_server, queue)
    second, _ = fake_instance(redis_server, queue)
    with first, second:
        yield first, second


def test_any_instance_answers_for_a_job_another_accepted(
    two_instances: tuple[ServerThread, ServerThread], redis_server: RedisServer, queue: str
) -> None:
    first, second = two_instances
    body = {"batch_id": "b", "chunks": chunks(60)}
    with first.client() as one, second.client() as two:
        direct = one.post("/embed", json=body).json()
        jobs = [one.post("/v1/jobs", json={"type": "embed", "input": body}).json() for _ in range(4)]
        finals = [follow(two, job["job_id"])[-1] for job in jobs]  # read through the other instance
        health = two.get("/health").json()
    assert [final["status"] for final in finals] == ["COMPLETED"] * 4
    for final in finals:
        assert final["progress"] == {"done": 60, "total": 60}
        vectors = np.array([v["vector"] for v in final["output"]["vectors"]])
        np.testing.assert_allclose(vectors, np.array([v["vector"] for v in direct["vectors"]]), atol=1e-6)
    assert health["jobs"]["backend"] == "redis" and health["jobs"]["status"] == "ok"
    client = redis_server.client()
    assert client.xlen(f"{queue}:stream") == 0  # every entry acknowledged and removed
    assert client.scard(f"{queue}:active") == 0
    ttl = client.ttl(f"{queue}:job:{jobs[0]['job_id']}")
    assert 0 < ttl <= 3600  # finished jobs expire with JOB_RESULT_TTL_S
    assert client.hget(f"{queue}:job:{jobs[0]['job_id']}", "spec") is None  # the input is dropped


def test_cancel_through_another_instance_stops_the_job_and_max_active_counts_the_cluster(
    redis_server: RedisServer, queue: str
) -> None:
    first, backend_one = fake_instance(redis_server, queue, max_active_jobs=1)
    second, backend_two = fake_instance(redis_server, queue, max_active_jobs=1)
    with first, second, first.client() as one, second.client() as two:
        for backend in (backend_one, backend_two):
            backend.gate.clear()
            backend.batch_started.clear()
        job = one.post("/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(400)}})
        assert job.status_code == 202
        refused = two.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(2)}}
        )
        wait_for(lambda: backend_one.batch_started.is_set() or backend_two.batch_started.is_set(), "job runs")
        status_url = job.json()["status_url"]
        assert two.delete(status_url).json()["status"] == "IN_PROGRESS"  # stops before its next slice
        backend_one.gate.set()
        backend_two.gate.set()
        final = follow(two, job.json()["job_id"])[-1]
        assert two.delete(status_url).status_code == 200  # a finished job is deleted
        assert one.get(status_url).status_code == 404
    assert (
        refused.status_code == 429
        and "in the cluster (MAX_ACTIVE_JOBS=1)" in refused.json()["error"]["message"]
    )
    assert final["status"] == "CANCELLED" and "output" not in final
    assert final["progress"]["done"] < 400


def test_a_job_is_visible_only_to_the_api_key_that_created_it(redis_server: RedisServer, queue: str) -> None:
    server, _ = fake_instance(redis_server, queue, api_keys="key-a,key-b")
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    with server, server.client() as client:
        job = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(3)}}, headers=a
        ).json()
        assert (
            follow(httpx.Client(base_url=server.url, headers=a), job["job_id"])[-1]["status"] == "COMPLETED"
        )
        other_get = client.get(job["status_url"], headers=b)
        other_delete = client.delete(job["status_url"], headers=b)
        own = client.get(job["status_url"], headers=a)
    assert (other_get.status_code, other_delete.status_code, own.status_code) == (404, 404, 200)
    stored = redis_server.client().hget(f"{queue}:job:{job['job_id']}", "owner")
    assert stored and b"key-a" not in stored  # a digest, never the key


def test_redis_unreachable_at_start_up_exits_2_naming_the_url() -> None:
    url = f"redis://127.0.0.1:{free_ports(1)}/0"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "reranker", "--port", str(free_ports(1)), "--job-backend", "redis"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "REDIS_URL": url, "ENV_FILE": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert url in result.stderr and "JOB_BACKEND=redis" in result.stderr


def test_redis_lost_while_serving_refuses_submissions_then_recovers(tmp_path: Path, queue: str) -> None:
    body = {"type": "embed", "input": {"batch_id": "b", "chunks": chunks(5)}}
    with RedisServer(tmp_path / "redis") as redis:
        server, _ = fake_instance(redis, queue)
        with server, server.client() as client:
            assert client.post("/v1/jobs", json=body).status_code == 202
            redis.kill()
            refused = client.post("/v1/jobs", json=body)
            server.wait_until(lambda: client.get("/health").json()["status"] == "degraded", "degraded", 30)
            degraded = client.get("/health")
            inference = client.post("/embed", json=body["input"])
            redis.start()  # the same port, empty
            server.wait_until(lambda: client.get("/health").json()["status"] == "healthy", "recovered", 30)
            accepted = client.post("/v1/jobs", json=body)
            assert accepted.status_code == 202, accepted.text
            final = follow(client, accepted.json()["job_id"])[-1]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["type"] == "job_store_unavailable"
    assert (
        redis.url in refused.json()["error"]["message"]
        and "unreachable" in refused.json()["error"]["message"]
    )
    assert degraded.status_code == 200  # inference still answers: the instance stays in rotation
    assert degraded.json()["jobs"]["status"] == "unavailable" and redis.url in degraded.json()["error"]
    assert inference.status_code == 200
    assert accepted.status_code == 202 and final["status"] == "COMPLETED"


def test_a_sigkilled_worker_s_job_is_taken_over_and_completes_with_the_same_output(
    redis_server: RedisServer, queue: str
) -> None:
    """Two real server processes on the real model; the one running the job is SIGKILLed mid-job."""
    env = {
        "BACKEND": "torch",
        "DTYPE": "float32",  # the job's vectors are compared with /embed's to 1e-5
        "BATCH_SIZE": "16",
        "ENV_FILE": "/nonexistent",
        **{key.upper(): str(value) for key, value in redis_settings(redis_server, queue).items()},
        "JOB_LEASE_S": "2",
    }
    records = redis_server.client()
    with server_process(env) as (url_one, pid_one), server_process(env) as (url_two, pid_two):
        urls = {pid_one: url_one, pid_two: url_two}
        for size in (600, 2400, 9600):  # a bigger job when a fast machine finished it before the kill
            body = {"batch_id": "takeover", "chunks": chunks(size, "a chunk of text to embed")}
            job = httpx.post(f"{url_one}/v1/jobs", json={"type": "embed", "input": body}, timeout=120).json()
            key = f"{queue}:job:{job['job_id']}"
            wait_for(lambda key=key: records.hget(key, "status") != b"QUEUED", "a worker takes the job", 300)
            victim = next(pid for pid in urls if f"-{pid}-".encode() in records.hget(key, "worker"))
            os.kill(victim, signal.SIGSTOP)  # frozen: it cannot finish the job while we look
            if records.hget(key, "status") == b"IN_PROGRESS":
                os.kill(victim, signal.SIGKILL)
                break
            os.kill(victim, signal.SIGCONT)
        survivor = urls[next(pid for pid in urls if pid != victim)]
        with httpx.Client(base_url=survivor, timeout=120) as client:
            final = follow(client, job["job_id"], timeout_s=600)[-1]
            direct = client.post("/embed", json=body).json()
        attempts = int(records.hget(key, "attempts"))
    assert final["status"] == "COMPLETED", final
    assert attempts == 2  # taken over once
    assert [v["chunk_id"] for v in final["output"]["vectors"]] == [c["chunk_id"] for c in body["chunks"]]
    np.testing.assert_allclose(
        np.array([v["vector"] for v in final["output"]["vectors"]]),
        np.array([v["vector"] for v in direct["vectors"]]),
        atol=1e-5,
    )
    assert records.xlen(f"{queue}:stream") == 0 and records.scard(f"{queue}:active") == 0


def test_a_job_whose_workers_keep_dying_fails_after_job_max_attempts(
    redis_server: RedisServer, queue: str
) -> None:
    server, backend = fake_instance(redis_server, queue, job_lease_s=0.5, job_max_attempts=2)
    records = redis_server.client()
    with server, server.client() as client:
        # This instance's worker must not run it: it is busy with another job.
        blocker = occupy_worker(client, backend, "b")
        poison = embed_job(client, "p", 8)
        key = f"{queue}:job:{poison.json()['job_id']}"
        # Two workers take it in turn and die without a word (the live one is busy meanwhile).
        stream = f"{queue}:stream"
        [[_, [(entry, _)]]] = records.xreadgroup("workers", "ghost-1", {stream: ">"}, count=1, block=30_000)
        assert records.xclaim(stream, "workers", "ghost-2", min_idle_time=0, message_ids=[entry])
        backend.gate.set()  # the live worker finds it idle past the lease, delivered twice already
        final = follow(client, poison.json()["job_id"])[-1]
        assert follow(client, blocker.json()["job_id"])[-1]["status"] == "COMPLETED"
    assert final["status"] == "FAILED" and final["error"]["type"] == "job_failed_repeatedly"
    assert "JOB_MAX_ATTEMPTS=2" in final["error"]["message"]
    assert records.ttl(key) > 0 and records.xlen(f"{queue}:stream") == 0


def test_an_instance_that_stops_hands_its_running_job_to_another_at_once(
    redis_server: RedisServer, queue: str
) -> None:
    """A graceful stop does not wait for the lease (set far longer than this test may take)."""
    leaving, backend = fake_instance(redis_server, queue, job_lease_s=600)
    staying, _ = fake_instance(redis_server, queue, job_lease_s=600)
    records = redis_server.client()
    leaving.start()
    try:
        with leaving.client() as client:
            backend.gate.clear()
            backend.batch_started.clear()
            job = client.post(
                "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(64)}}
            ).json()
        assert backend.batch_started.wait(30)  # ``leaving`` runs it; its first batch is held
        key = f"{queue}:job:{job['job_id']}"
        staying.start()
        stopping = threading.Thread(target=leaving.stop)
        stopping.start()
        taker = staying.runtime.jobs._consumer
        wait_for(lambda: records.hget(key, "worker") == taker.encode(), "the other instance takes it", 60)
        backend.gate.set()  # let ``leaving``'s held batch end, so it can finish stopping
        stopping.join(timeout=60)
        with staying.client() as client:
            final = follow(client, job["job_id"], timeout_s=120)[-1]
    finally:
        backend.gate.set()
        leaving.stop()
        staying.stop()
    assert final["status"] == "COMPLETED" and final["progress"] == {"done": 64, "total": 64}
    assert records.hget(key, "worker") == taker.encode()
    assert int(records.hget(key, "attempts")) == 1  # a hand-back is not a failed delivery


def test_a_queued_job_cancelled_is_never_run_and_its_entry_is_retired(
    redis_server: RedisServer, queue: str
) -> None:
    server, backend = fake_instance(redis_server, queue)
    records = redis_server.client()
    with server, server.client() as client:
        running = occupy_worker(client, backend, "r")
        queued = embed_job(client, "q", 8)
        cancelled = client.delete(queued.json()["status_url"]).json()
        backend.gate.set()
        assert follow(client, running.json()["job_id"])[-1]["status"] == "COMPLETED"
        wait_for(lambda: records.xlen(f"{queue}:stream") == 0, "the cancelled job's entry is retired")
        final = client.get(queued.json()["status_url"]).json()
    assert cancelled["status"] == "CANCELLED" and final["status"] == "CANCELLED"
    assert final["started_at"] is None and final["progress"]["done"] == 0  # never run
    assert records.hget(f"{queue}:job:{queued.json()['job_id']}", "worker") is None


def test_a_big_output_is_stored_in_parts_that_expire_and_go_with_the_job(
    redis_server: RedisServer, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One Redis string holds at most 512 MB, less than a 200,000-chunk embed job answers: the output
    is kept in parts (here 1 KiB, so that 60 vectors take several) and read back whole."""
    from reranker.engine import job_redis

    monkeypatch.setattr(job_redis, "OUTPUT_PART_BYTES", 1024)
    body = {"batch_id": "b", "chunks": chunks(60)}
    server, _ = fake_instance(redis_server, queue)
    with server, server.client() as client:
        direct = client.post("/embed", json=body).json()
        job_id = client.post("/v1/jobs", json={"type": "embed", "input": body}).json()["job_id"]
        final = follow(client, job_id)[-1]
        store = redis_server.client()
        parts = sorted(store.keys(f"{queue}:job:{job_id}:out:*"))
        ttls = [store.ttl(key) for key in parts]
        deleted = client.delete(f"/v1/jobs/{job_id}")
        left = store.keys(f"{queue}:job:{job_id}*")
        tombstone = f"{queue}:job:{job_id}:deleted"  # reading it says it was deleted, for the result's TTL
        tombstone_ttl = store.ttl(tombstone)
    assert final["status"] == "COMPLETED"
    assert [v["chunk_id"] for v in final["output"]["vectors"]] == [c["chunk_id"] for c in body["chunks"]]
    np.testing.assert_allclose(
        np.array([v["vector"] for v in final["output"]["vectors"]]),
        np.array([v["vector"] for v in direct["vectors"]]),
        atol=1e-6,
    )
    assert len(parts) > 3 and all(0 < ttl <= 3600 for ttl in ttls)
    assert deleted.status_code == 200 and left == [tombstone.encode()] and 0 < tombstone_ttl <= 3600


def test_a_stopped_instance_leaves_no_consumer_behind(redis_server: RedisServer, queue: str) -> None:
    """One consumer name per process start: without removal the group's list grows with restarts."""
    for _ in range(2):
        server, _ = fake_instance(redis_server, queue)
        with server, server.client() as client:
            job_id = client.post(
                "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(3)}}
            ).json()["job_id"]
            assert follow(client, job_id)[-1]["status"] == "COMPLETED"
            assert len(redis_server.client().xinfo_consumers(f"{queue}:stream", "workers")) == 1
    assert redis_server.client().xinfo_consumers(f"{queue}:stream", "workers") == []


def test_a_cancel_that_finds_the_job_finished_since_it_was_read_says_so(
    redis_server: RedisServer, queue: str
) -> None:
    """Found by tests/test_job_state_machine.py: DELETE read the job IN_PROGRESS, the job finished, the
    cancel script then deleted it as a finished job and the answer still said IN_PROGRESS; RunPod's
    /cancel, which keeps finished jobs, deleted one that finished between its read and its cancel."""
    from reranker.engine.job_redis import RedisJobs
    from reranker.engine.jobs import FINISHED, Job, JobStatus

    async def scenario() -> tuple[Job, bool, list[bytes]]:
        jobs = RedisJobs(make_settings(**redis_settings(redis_server, queue)))
        await jobs.start()

        async def runner(job: Job) -> dict[str, object]:
            return {"answer": 42}

        try:
            job = await jobs.submit("embed", 1, {"type": "embed", "input": {}}, None)
            stale = await jobs.get(job.id, None)  # QUEUED: no worker runs yet
            assert stale.status is JobStatus.QUEUED
            jobs.start_worker(runner)
            while (await jobs.get(job.id, None)).status not in FINISHED:
                await asyncio.sleep(0.01)  # polling the store, as a client does
            real_get = jobs.get
            stale_reads = [stale]

            async def read_before_it_finished(job_id: str, owner: str | None) -> Job:
                current = await real_get(job_id, owner)
                return stale_reads.pop() if stale_reads else current

            jobs.get = read_before_it_finished  # the interleaving: read, then the job finishes
            kept = await jobs.cancel(job.id, None, delete_finished=False)  # RunPod's /cancel keeps it
            assert kept.status is JobStatus.COMPLETED and kept.output == {"answer": 42}
            stale_reads.append(stale)
            answer = await jobs.cancel(job.id, None)
            client = redis_server.client()
            return answer, bool(client.exists(f"{queue}:job:{job.id}")), client.keys(f"{queue}:*out*")
        finally:
            await jobs.close()

    answer, record_left, parts_left = asyncio.run(scenario())
    assert answer.status is JobStatus.COMPLETED and answer.done == answer.total == 1
    assert not record_left and parts_left == []
