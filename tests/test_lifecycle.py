"""Loading, readiness and load failure, observed over HTTP."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from reranker.api.app import create_app
from reranker.backends.base import Backend, ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine import resources
from reranker.engine.model import RELEASE_MEMORY_AFTER_ITEMS
from reranker.engine.runtime import Runtime
from reranker.settings import Settings
from tests.conftest import make_settings
from tests.server import ServerThread


def test_health_says_loading_until_the_model_is_ready() -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow_factory(settings: Settings) -> Backend:
        entered.set()
        release.wait(30)
        return FakeBackend(ModelKind.BI_ENCODER)

    server = ServerThread(create_app(make_settings(), backend_factory=slow_factory)).start(wait_ready=False)
    try:
        assert entered.wait(30)
        with server.client() as client:
            assert client.get("/livez").status_code == 200
            loading = client.get("/health")
            assert (loading.status_code, loading.json()["status"]) == (503, "loading")
            assert client.get("/readyz").status_code == 503
            refused = client.post("/rerank", json={"query": "q", "documents": ["d"]})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
            assert "retry-after" in refused.headers
            release.set()
            server.wait_until(lambda: server.runtime.ready.is_set(), "ready", 30)
            assert client.get("/health").json()["status"] == "healthy"
            assert client.post("/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200
    finally:
        release.set()
        server.stop()


def test_load_failure_is_unhealthy_and_reported() -> None:
    failures: list[BaseException] = []

    def broken_factory(settings: Settings) -> Backend:
        raise RuntimeError("weights are corrupt")

    app = create_app(make_settings(), backend_factory=broken_factory, on_fatal=failures.append)
    with ServerThread(app) as server, server.client() as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        assert "weights are corrupt" in health.json()["error"]
        assert client.post("/rerank", json={"query": "q", "documents": ["d"]}).status_code == 503
    assert [str(f) for f in failures] == ["weights are corrupt"]


def test_a_failed_memory_trim_after_a_burst_is_logged_not_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22: the allocator trim ran in the executor and its future was dropped, error and all."""

    def broken_trim() -> bool:
        raise OSError("malloc_trim went wrong")

    monkeypatch.setattr(resources, "trim_allocator", broken_trim)
    runtime = Runtime(make_settings(), backend=FakeBackend(ModelKind.BI_ENCODER))

    async def burst() -> None:
        runtime.default._after_burst(RELEASE_MEMORY_AFTER_ITEMS)
        [trim] = runtime.default._trims  # held while it runs
        await asyncio.gather(trim, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="reranker.engine.runtime"):
        asyncio.run(burst())
    assert runtime.metrics.memory_trims == 1 and not runtime.default._trims
    assert "malloc_trim went wrong" in caplog.text
