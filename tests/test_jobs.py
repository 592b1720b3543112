"""Asynchronous jobs: a 3,000-chunk embed job on the real model, priority, cancel, TTL, restart."""

from __future__ import annotations

import errno
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.job_local import JobStore
from reranker.engine.jobs import Job, JobStatus
from tests.conftest import make_settings
from tests.scripts import free_ports
from tests.server import ServerThread

RERANK = {
    "query": "how long does a broken bone take to heal",
    "documents": [f"document {i}: bones heal in weeks, calcium and rest help recovery" for i in range(8)],
}


def chunks(count: int, prefix: str = "chunk") -> list[dict[str, str]]:
    return [
        {"chunk_id": f"c{i}", "content": f"{prefix} {i} about topic {i % 23} and its details"}
        for i in range(count)
    ]


def follow(client: httpx.Client, job_id: str, timeout_s: float = 300) -> list[dict]:
    """Every status read until the job is finished (polling the observable state)."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(view)
        if view["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return seen
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} never finished")


def job_in_the_model(client: httpx.Client, backend: FakeBackend, count: int, batch_id: str = "b") -> dict:
    """Submit an embed job of ``count`` chunks with the model held (``backend.gate`` closed) and
    wait until its first batch is in the model; the caller opens the gate."""
    backend.gate.clear()
    backend.batch_started.clear()
    body = {"batch_id": batch_id, "chunks": chunks(count)}
    accepted = client.post("/v1/jobs", json={"type": "embed", "input": body})
    assert accepted.status_code == 202, accepted.text
    assert backend.batch_started.wait(30)
    return accepted.json()


def median_rerank_ms(client: httpx.Client, count: int = 10) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert client.post("/rerank", json=RERANK).status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@pytest.fixture(scope="module")
def model_server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings(request_timeout_s=300))) as server:
        yield server


def test_a_3000_chunk_embed_job_completes_with_direct_vectors_and_interactive_latency_holds(
    model_server: ServerThread,
) -> None:
    body = {"batch_id": "repo", "chunks": chunks(3000)}
    with model_server.client() as client:
        direct = client.post("/embed", json=body)
        assert direct.status_code == 200, direct.text
        direct = direct.json()
        idle_ms = median_rerank_ms(client)
        accepted = client.post("/v1/jobs", json={"type": "embed", "input": body})
        assert accepted.status_code == 202
        job = accepted.json()
        assert job["status"] == "QUEUED" and accepted.headers["location"] == job["status_url"]
        model_server.wait_until(
            lambda: client.get(job["status_url"]).json()["progress"]["done"] > 0, "job started", 60
        )
        busy_ms = median_rerank_ms(client)
        still_running = client.get(job["status_url"]).json()["status"] == "IN_PROGRESS"
        history = follow(client, job["job_id"])
    print(f"/rerank (8 documents) median latency: idle {idle_ms:.0f} ms, while the job runs {busy_ms:.0f} ms")
    assert still_running, "the latency was measured while the job ran"
    statuses = [view["status"] for view in history]
    done = [view["progress"]["done"] for view in history]
    assert statuses[-1] == "COMPLETED" and "IN_PROGRESS" in statuses
    assert done == sorted(done) and len(set(done)) > 2  # progress rose batch by batch
    assert history[-1]["progress"] == {"done": 3000, "total": 3000}
    output = history[-1]["output"]
    assert [v["chunk_id"] for v in output["vectors"]] == [v["chunk_id"] for v in direct["vectors"]]
    np.testing.assert_allclose(
        np.array([v["vector"] for v in output["vectors"]]),
        np.array([v["vector"] for v in direct["vectors"]]),
        atol=1e-6,
    )


def gated_server(**settings: object) -> tuple[ServerThread, FakeBackend]:
    backend = FakeBackend(ModelKind.BI_ENCODER)
    return ServerThread(create_app(make_settings(batch_size=8, **settings), backend=backend)), backend


def test_cancel_stops_a_running_job_before_its_next_slice() -> None:
    server, backend = gated_server()
    with server, server.client() as client:
        backend.gate.clear()
        backend.batch_started.clear()
        batches_before = len(backend.batches)
        job = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(400)}}
        ).json()
        assert backend.batch_started.wait(30)
        assert client.delete(job["status_url"]).json()["status"] == "IN_PROGRESS"  # stops at the slice's end
        backend.gate.set()
        final = follow(client, job["job_id"])[-1]
        assert final["status"] == "CANCELLED" and "output" not in final
        assert final["progress"] == {"done": 8, "total": 400}  # one slice: one batch
        assert client.get("/health").json()["controller"]["queued"] == 0
        assert len(backend.batches) == batches_before + 1  # no model work after the cancel
        assert client.delete(job["status_url"]).status_code == 200  # a finished job is deleted
        assert client.get(job["status_url"]).status_code == 404


def test_job_batches_are_full_when_idle_and_a_request_rides_the_next_batch() -> None:
    """Asserted on the batches that ran: a job alone fills whole batches; a request that arrives
    while a job batch runs goes next, and the job's batches shrink to a quarter meanwhile."""
    server, backend = gated_server()
    with server, server.client() as client, ThreadPoolExecutor(1) as pool:
        backend.batches.clear()  # forget the warm-up pass
        job = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(40)}}
        )
        assert follow(client, job.json()["job_id"])[-1]["status"] == "COMPLETED"
        assert [len(batch) for batch in backend.batches] == [8] * 5  # idle: full batches
        backend.batches.clear()
        backend.gate.clear()
        backend.batch_started.clear()
        job = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(400)}}
        ).json()
        assert backend.batch_started.wait(30)  # a job batch runs; the next slice waits behind it
        request = {"batch_id": "i", "chunks": [{"chunk_id": "x", "content": "one interactive text"}]}
        interactive = pool.submit(client.post, "/embed", json=request)
        server.wait_until(lambda: server.runtime.controller.queued == 2, "request queued", 10)
        backend.gate.set()
        assert interactive.result().status_code == 200
        server.wait_until(lambda: len(backend.batches) >= 3, "job goes on", 10)
        client.delete(job["status_url"])
        follow(client, job["job_id"])
    sizes = [len(batch) for batch in backend.batches]
    assert sizes[:3] == [8, 1, 2], sizes  # job batch, the request, then quarter job batches


def test_a_bi_encoder_rerank_job_embeds_its_query_once() -> None:
    seen: list[list[int]] = []
    backend = FakeBackend(
        ModelKind.BI_ENCODER, fail_when=lambda batch: seen.extend(list(i.ids) for i in batch)
    )
    query = "apple pie recipe"
    body = {"query": query, "documents": [f"apple {i} pie" for i in range(40)]}
    with (
        ServerThread(create_app(make_settings(batch_size=8), backend=backend)) as server,
        server.client() as client,
    ):
        seen.clear()
        direct = client.post("/v1/rerank", json=body).json()
        seen.clear()
        job = client.post("/v1/jobs", json={"type": "rerank", "input": body}).json()
        output = follow(client, job["job_id"])[-1]["output"]
    query_ids = list(backend.tokenize_texts([query])[0].ids)
    assert sum(1 for ids in seen if ids == query_ids) == 1
    assert len(seen) == 41
    assert output["results"] == direct["results"]


def test_max_active_jobs_is_a_429_with_retry_after() -> None:
    server, backend = gated_server(max_active_jobs=1)
    with server, server.client() as client:
        backend.gate.clear()
        first = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(20)}}
        )
        refused = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(2)}}
        )
        backend.gate.set()
        assert first.status_code == 202
        assert refused.status_code == 429 and refused.headers["retry-after"] == "10"
        assert "MAX_ACTIVE_JOBS=1" in refused.json()["error"]["message"]
        assert follow(client, first.json()["job_id"])[-1]["status"] == "COMPLETED"


def test_bad_job_input_is_refused_at_submission() -> None:
    server, _ = gated_server()
    with server, server.client() as client:
        no_type = client.post("/v1/jobs", json={"input": {}})
        bad_embed = client.post("/v1/jobs", json={"type": "embed", "input": {"chunks": []}})
        bad_rerank = client.post(
            "/v1/jobs", json={"type": "rerank", "input": {"query": "q", "documents": []}}
        )
    assert [r.status_code for r in (no_type, bad_embed, bad_rerank)] == [422, 422, 422]
    assert "type" in no_type.json()["error"]["message"] and "batch_id" in bad_embed.json()["error"]["message"]


def rerank_job_and_direct(backend: FakeBackend, body: dict) -> tuple[dict, dict]:
    """(a rerank job's output, /v1/rerank's answer) for ``body`` on a server around ``backend``."""
    with (
        ServerThread(create_app(make_settings(batch_size=8), backend=backend)) as server,
        server.client() as client,
    ):
        direct = client.post("/v1/rerank", json=body).json()
        job = client.post("/v1/jobs", json={"type": "rerank", "input": body}).json()
        return follow(client, job["job_id"])[-1]["output"], direct


def test_a_rerank_job_answers_like_v1_rerank() -> None:
    body = {
        "query": "apple pie",
        "documents": [f"apple {i} pie" if i % 3 else f"car {i}" for i in range(50)],
        "top_n": 5,
    }
    output, direct = rerank_job_and_direct(FakeBackend(ModelKind.CROSS_ENCODER), body)
    assert output["results"] == direct["results"]


def test_finished_jobs_are_evicted_after_the_ttl() -> None:
    server, _ = gated_server(job_result_ttl_s=0.5)
    with server, server.client() as client:
        job = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(3)}}
        ).json()
        assert follow(client, job["job_id"])[-1]["status"] == "COMPLETED"
        server.wait_until(lambda: client.get(job["status_url"]).status_code == 404, "eviction", 10)
        assert "JOB_RESULT_TTL_S" in client.get(job["status_url"]).json()["error"]["message"]


def test_job_store_keeps_results_on_disk_fails_interrupted_jobs_and_quarantines_leftovers(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "jobs"
    server, _ = gated_server(job_store_dir=str(directory))
    with server, server.client() as client:
        done = client.post(
            "/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(5)}}
        ).json()
        completed = follow(client, done["job_id"])[-1]
    # What a crash leaves behind: a job recorded IN_PROGRESS, a half-written file, a damaged one.
    crashed = Job(id="crashed", type="embed", total=50, status=JobStatus.IN_PROGRESS, started_at=1.0)
    JobStore(directory).save(crashed)
    (directory / ".leftover.123.tmp").write_bytes(b'{"job_id": "half')
    (directory / "damaged.json").write_bytes(b"\x00not json")
    restarted, _ = gated_server(job_store_dir=str(directory))
    with restarted, restarted.client() as client:
        in_memory = restarted.runtime.jobs._jobs[done["job_id"]]
        assert in_memory.output is None  # results stay on disk until asked for
        kept = client.get(done["status_url"]).json()
        interrupted = client.get("/v1/jobs/crashed").json()
        health = client.get("/health").json()
    assert kept == completed  # the result, vectors and all, survived the restart
    # Start-up reads only the small records: the result is a file of its own.
    assert "output" not in orjson.loads((directory / f"{done['job_id']}.json").read_bytes())
    assert orjson.loads((directory / f"{done['job_id']}.output.json").read_bytes()) == completed["output"]
    assert interrupted["status"] == "FAILED"
    assert interrupted["error"]["type"] == "interrupted" and "IN_PROGRESS" in interrupted["error"]["message"]
    assert sorted(health["jobs"]["quarantined"]) == [".leftover.123.tmp", "damaged.json"]
    assert sorted(p.name for p in (directory / "quarantine").iterdir()) == [
        ".leftover.123.tmp",
        "damaged.json",
    ]
    assert not list(directory.glob("*.tmp")) and not (directory / "damaged.json").exists()


def test_a_second_process_on_the_same_job_store_refuses_to_start(tmp_path: Path) -> None:
    directory = tmp_path / "jobs"
    server, _ = gated_server(job_store_dir=str(directory))
    with server:
        result = subprocess.run(
            [sys.executable, "-m", "reranker", "--port", str(free_ports(1))],
            env={
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "JOB_STORE_DIR": str(directory),
                "ENV_FILE": "/nonexistent",
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2, result.stderr
    assert str(directory) in result.stderr and "JOB_BACKEND=redis" in result.stderr


def test_a_store_that_refuses_writes_fails_that_job_or_submission_never_the_worker(tmp_path: Path) -> None:
    server, backend = gated_server(job_store_dir=str(tmp_path / "jobs"), max_active_jobs=1)
    store = server.runtime.jobs._store
    disk_full = threading.Event()
    real_save = store.save

    def save(job: Job) -> None:  # fault injection: the disk fills up while disk_full is set
        if disk_full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(job)

    store.save = save
    body = {"type": "embed", "input": {"batch_id": "b", "chunks": chunks(20)}}
    with server, server.client() as client:
        disk_full.set()
        refused = client.post("/v1/jobs", json=body)
        disk_full.clear()
        backend.gate.clear()
        backend.batch_started.clear()
        running = client.post("/v1/jobs", json=body)  # MAX_ACTIVE_JOBS=1: no phantom job counts
        assert backend.batch_started.wait(30)
        disk_full.set()
        backend.gate.set()
        failed = follow(client, running.json()["job_id"])[-1]
        disk_full.clear()
        after = client.post("/v1/jobs", json=body)
        completed = follow(client, after.json()["job_id"])[-1]
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "job_store_unavailable"
    assert "No space left on device" in refused.json()["error"]["message"]
    assert running.status_code == 202
    assert failed["status"] == "FAILED" and failed["error"]["type"] == "job_store_error"
    assert "No space left on device" in failed["error"]["message"]
    assert completed["status"] == "COMPLETED"  # the worker lives on


@pytest.mark.parametrize(
    ("job_type", "body", "named"),
    [
        (
            "embed",
            {
                "batch_id": "b",
                "truncate": False,
                "chunks": [*chunks(3), {"chunk_id": "long", "content": "w " * 200}],
            },
            "input.chunks.3 (chunk_id 'long')",
        ),
        (
            "rerank",
            {"query": "q", "truncate": "NONE", "documents": ["short", "word " * 200, "word " * 300]},
            "input.documents.1",
        ),
    ],
)
def test_too_long_inputs_without_truncation_are_refused_at_submission(
    job_type: str, body: dict, named: str
) -> None:
    server, backend = gated_server()
    with server, server.client() as client:
        batches = len(backend.batches)
        refused = client.post("/v1/jobs", json={"type": job_type, "input": body})
        active = server.runtime.jobs.active
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert message.startswith(named) and "64-token window" in message
    assert active == 0 and len(backend.batches) == batches  # nothing queued, no model work


def test_with_api_keys_a_job_is_visible_only_to_the_key_that_created_it() -> None:
    server, _ = gated_server(api_keys="key-a,key-b")
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    with server, httpx.Client(base_url=server.url, headers=a) as owner, server.client() as client:
        job = owner.post("/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks(3)}})
        assert follow(owner, job.json()["job_id"])[-1]["status"] == "COMPLETED"
        status_url = job.json()["status_url"]
        other = (client.get(status_url, headers=b), client.delete(status_url, headers=b))
        own = owner.get(status_url)
    assert [response.status_code for response in other] == [404, 404]
    assert own.status_code == 200 and own.json()["output"]["usage"]["chunks"] == 3
