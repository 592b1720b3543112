"""Jobs across a cluster: 2 instances with JOB_BACKEND=redis behind the shipped nginx config.

A real redis-server (the session's: tests/redis_server.py), two daemons from
``manage_reranker.sh cluster-start 2`` and a real nginx. 20 embed and rerank jobs (half
through /v1/jobs, half through RunPod's /run) are submitted and polled through nginx; the
instance running one of them is SIGKILLed in the middle of it. Every job completes once,
with the output the synchronous endpoints give, and the killed instance's job is taken
over by the other one after the lease.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from reranker.ops.instances import is_reranker_process
from tests.nginx_proxy import managed_cluster, nginx_in_front
from tests.redis_server import RedisServer
from tests.scripts import free_ports, script_env, wait_for

JOBS = 20
LEASE_S = 2  # JOB_LEASE_S: a dead worker's job moves on after this
QUEUE = "job-cluster-test"  # REDIS_JOB_QUEUE: apart from the other tests on the session's Redis
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


def job_input(number: int) -> tuple[str, str, dict[str, Any]]:
    """Job ``number``: (route it is submitted to, synchronous endpoint, input). Each job's texts
    are its own, so a result handed to the wrong job shows."""
    route = "/v1/jobs" if number % 2 == 0 else "/run"
    if number % 4 < 2:
        chunks = [
            {"chunk_id": f"j{number}-c{i}", "content": f"job {number}, chunk {i}: notes on topic {i % 13}"}
            for i in range(160)
        ]
        return route, "/embed", {"batch_id": f"batch-{number}", "chunks": chunks}
    documents = [f"document {i} of job {number} about bones, fractures and topic {i % 11}" for i in range(96)]
    query = f"how long does fracture {number} take to heal"
    return route, "/v1/rerank", {"query": query, "documents": documents, "top_n": 10}


class JobCluster:
    def __init__(self, tmp: Path, redis: RedisServer) -> None:
        self.base_port = free_ports(2)
        self.ports = [self.base_port, self.base_port + 1]
        self.env = script_env(
            tmp,
            self.base_port,
            JOB_BACKEND="redis",
            REDIS_URL=redis.url,
            REDIS_JOB_QUEUE=QUEUE,
            JOB_LEASE_S=str(LEASE_S),
            MAX_ACTIVE_JOBS=str(JOBS),
        )
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "logs"

    def pid(self, port: int) -> int:
        return int((self.run_dir / f"reranker-{port}.pid").read_text())


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobCluster]:
    nodes = JobCluster(tmp_path_factory.mktemp("job-cluster"), redis_server)
    with managed_cluster(2, nodes.env):
        yield nodes


@pytest.fixture(scope="module")
def nginx_url(cluster: JobCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nginx_in_front(2, cluster.base_port, cluster.env, tmp_path_factory.mktemp("nginx")) as url:
        yield url


def submit(client: httpx.Client, number: int) -> str:
    route, _, given = job_input(number)
    if route == "/run":
        response = client.post("/run", json={"input": given})
        assert response.status_code == 200, response.text
        return response.json()["id"]
    job_type = "embed" if "chunks" in given else "rerank"
    response = client.post("/v1/jobs", json={"type": job_type, "input": given})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def read_status(client: httpx.Client, number: int, job_id: str) -> dict[str, Any]:
    """The job through nginx, as its submitter would read it (RunPod's shape for /run jobs)."""
    route, _, _ = job_input(number)
    response = client.get(f"/v1/jobs/{job_id}" if route == "/v1/jobs" else f"/status/{job_id}")
    assert response.status_code == 200, (route, response.status_code, response.text)
    return response.json()


def running_on(store: Any, job_id: str) -> str | None:
    """The worker (``host-PID-tag``) running the job, read from Redis; None unless IN_PROGRESS."""
    status, worker = store.hmget(f"{QUEUE}:job:{job_id}", ["status", "worker"])
    return worker.decode() if status == b"IN_PROGRESS" and worker else None


def same_output(endpoint: str, got: dict[str, Any], expected: dict[str, Any]) -> None:
    if endpoint == "/embed":
        assert got["batch_id"] == expected["batch_id"]
        assert [v["chunk_id"] for v in got["vectors"]] == [v["chunk_id"] for v in expected["vectors"]]
        np.testing.assert_allclose(
            np.array([v["vector"] for v in got["vectors"]]),
            np.array([v["vector"] for v in expected["vectors"]]),
            atol=1e-5,
        )
    else:
        assert [r["index"] for r in got["results"]] == [r["index"] for r in expected["results"]]
        assert [r["relevance_score"] for r in got["results"]] == pytest.approx(
            [r["relevance_score"] for r in expected["results"]], abs=1e-5
        )


def test_twenty_jobs_through_nginx_survive_a_sigkilled_instance(
    cluster: JobCluster, nginx_url: str, redis_server: RedisServer
) -> None:
    pids = {cluster.pid(port): port for port in cluster.ports}
    store = redis_server.client()
    with httpx.Client(base_url=nginx_url, timeout=120) as client:
        job_ids = [submit(client, number) for number in range(JOBS)]
        assert len(set(job_ids)) == JOBS

        # The victim: once a few jobs are done, an instance whose worker holds a running job. It
        # is frozen (SIGSTOP) and the job checked to be still its own and running before the
        # SIGKILL, so the kill lands mid-job on any machine speed.
        victim: dict[str, Any] = {}

        def froze_an_instance_mid_job() -> bool:
            statuses = [store.hget(f"{QUEUE}:job:{job_id}", "status") for job_id in job_ids]
            if statuses.count(b"COMPLETED") < 4:
                return False
            for job_id in job_ids:
                held = running_on(store, job_id)
                worker_pid = next((pid for pid in pids if held and f"-{pid}-" in held), None)
                if worker_pid is None:
                    continue
                os.kill(worker_pid, signal.SIGSTOP)
                if running_on(store, job_id) == held:
                    victim.update(job_id=job_id, pid=worker_pid, port=pids[worker_pid])
                    return True
                os.kill(worker_pid, signal.SIGCONT)  # it finished meanwhile: try again
            return False

        wait_for(froze_an_instance_mid_job, "an instance frozen while it runs a job", timeout_s=300)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        unfinished_at_kill = sum(
            read_status(client, number, job_id)["status"] not in FINISHED
            for number, job_id in enumerate(job_ids)
        )
        wait_for(lambda: not is_reranker_process(victim["pid"]), "the victim exits")

        finals: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 600
        while len(finals) < JOBS:
            assert time.monotonic() < deadline, f"unfinished: {sorted(set(range(JOBS)) - set(finals))}"
            for number, job_id in enumerate(job_ids):
                if number not in finals:
                    view = read_status(client, number, job_id)
                    if view["status"] in FINISHED:
                        finals[number] = view
            time.sleep(0.2)
        finished_s = time.monotonic() - killed_at

        expected = {}
        for number in range(JOBS):
            _, endpoint, given = job_input(number)
            response = client.post(endpoint, json=given)
            assert response.status_code == 200, response.text
            expected[number] = response.json()

    survivor = next(port for port in cluster.ports if port != victim["port"])
    workers = [store.hget(f"{QUEUE}:job:{job_id}", "worker").decode() for job_id in job_ids]
    ran = {pids[pid]: sum(f"-{pid}-" in worker for worker in workers) for pid in pids}
    print(
        f"jobs finished by instance: {ran}; "
        f"SIGKILLed instance {victim['port']} (PID {victim['pid']}) while it ran job "
        f"{victim['job_id']}; {unfinished_at_kill}/{JOBS} jobs unfinished then, all finished "
        f"{finished_s:.1f} s later on instance {survivor}"
    )
    assert unfinished_at_kill >= 1  # the kill came while jobs ran
    assert ran[victim["port"]] >= 1 and ran[survivor] >= 1  # both instances took work from the queue
    assert {view["status"] for view in finals.values()} == {"COMPLETED"}, finals
    for number, view in finals.items():
        _, endpoint, _ = job_input(number)
        same_output(endpoint, view["output"], expected[number])

    taken_over = store.hmget(f"{QUEUE}:job:{victim['job_id']}", ["attempts", "worker"])
    assert int(taken_over[0]) >= 2 and f"-{victim['pid']}-" not in taken_over[1].decode()
    # Exactly one result each: every queue entry acknowledged and deleted, no job left active.
    assert store.xlen(f"{QUEUE}:stream") == 0
    assert store.scard(f"{QUEUE}:active") == 0
    # ...and one stored output each: the one run recorded (a losing run's parts are deleted).
    for job_id in job_ids:
        recorded = store.hget(f"{QUEUE}:job:{job_id}", "output_parts").decode()
        stored = {key.decode() for key in store.scan_iter(f"{QUEUE}:job:{job_id}:out:*")}
        assert stored and {key.rpartition(":")[0] for key in stored} == {recorded.rpartition(":")[0]}
    survivor_log = (cluster.log_dir / f"reranker-{survivor}.log").read_text()
    assert f"job {victim['job_id']}: taken over" in survivor_log
