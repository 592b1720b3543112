"""A task the server cannot work without dies: probes say so at once and nobody hangs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.server import ServerThread


def kill(server: ServerThread, task: asyncio.Task) -> None:
    """Cancel ``task`` on the server's own event loop (as a bug raising in it would end it)."""
    loop = task.get_loop()
    loop.call_soon_threadsafe(task.cancel)
    server.wait_until(task.done, "task ended", 10)


def probes(client) -> dict[str, int]:
    return {path: client.get(path).status_code for path in ("/health", "/readyz", "/livez")}


def test_a_dead_batcher_fails_waiting_requests_with_500_and_turns_every_probe_unhealthy() -> None:
    backend = FakeBackend(ModelKind.CROSS_ENCODER)
    app = create_app(make_settings(request_timeout_s=120), backend=backend)
    with ServerThread(app) as server, server.client() as client, ThreadPoolExecutor(2) as pool:
        assert probes(client) == {"/health": 200, "/readyz": 200, "/livez": 200}
        backend.gate.clear()
        backend.batch_started.clear()
        running = pool.submit(client.post, "/rerank", json={"query": "q", "documents": ["a"]})
        assert backend.batch_started.wait(10)
        waiting = pool.submit(client.post, "/rerank", json={"query": "q", "documents": ["b"]})
        server.wait_until(lambda: server.runtime.controller.queued == 1, "queued", 10)
        kill(server, server.runtime.controller._batcher)
        failed = waiting.result(timeout=10)  # at once, not after REQUEST_TIMEOUT_S=120
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "backend_error"
        assert "batcher" in failed.json()["error"]["message"]
        assert probes(client) == {"/health": 503, "/readyz": 503, "/livez": 503}
        health = client.get("/health").json()
        assert health["status"] == "unhealthy" and "batcher" in health["error"]
        refused = client.post("/rerank", json={"query": "q", "documents": ["c"]})
        assert refused.status_code == 503 and "batcher" in refused.json()["error"]["message"]
        backend.gate.set()
        assert running.result(timeout=10).status_code == 200  # the batch already running delivers


def test_a_dead_job_worker_fails_its_jobs_and_turns_every_probe_unhealthy() -> None:
    backend = FakeBackend(ModelKind.BI_ENCODER)
    with ServerThread(create_app(make_settings(), backend=backend)) as server, server.client() as client:
        backend.gate.clear()
        backend.batch_started.clear()
        chunks = [{"chunk_id": str(i), "content": f"text {i}"} for i in range(100)]
        job = client.post("/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks}})
        assert backend.batch_started.wait(10)
        kill(server, server.runtime.jobs._worker)
        backend.gate.set()
        view = client.get(job.json()["status_url"]).json()
        assert view["status"] == "FAILED" and "job worker" in view["error"]["message"]
        assert probes(client) == {"/health": 503, "/readyz": 503, "/livez": 503}
        again = client.post("/v1/jobs", json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks}})
        assert again.status_code == 503 and "job worker" in again.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/health", "/readyz"])
def test_a_healthy_server_reports_its_resources(path: str) -> None:
    with (
        ServerThread(create_app(make_settings(), backend=FakeBackend())) as server,
        server.client() as client,
    ):
        assert client.get(path).status_code == 200
        resources = client.get("/health").json()["resources"]
    assert resources["cpus"] >= 1 and resources["threads_per_batch"] >= 1
    assert resources["memory_limit_bytes"] > 0 and resources["memory_because"]
