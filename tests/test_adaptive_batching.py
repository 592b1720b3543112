"""Adaptive batch sizing, embed limits and model-kind refusals, on the fake backend over HTTP."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.base import Encoded, ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.adaptive import BatchSizer
from tests.conftest import make_settings
from tests.server import ServerThread


def oom_above(limit: int):
    def fail(batch: Sequence[Encoded]) -> Exception | None:
        return MemoryError(f"cannot allocate a batch of {len(batch)}") if len(batch) > limit else None

    return fail


def test_out_of_memory_shrinks_the_batch_and_returns_every_vector(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(ModelKind.BI_ENCODER, fail_when=oom_above(5))
    app = create_app(make_settings(batch_size=32, embedding_max_batch_size=64), backend=backend)
    texts = [f"text {i} " + "w " * (i % 7) for i in range(200)]
    caplog.set_level(logging.INFO, logger="reranker")
    with ServerThread(app) as server, server.client() as client:
        body = {"batch_id": "b", "chunks": [{"chunk_id": str(i), "content": t} for i, t in enumerate(texts)]}
        response = client.post("/embed", json=body)
        limit = client.get("/health").json()["controller"]["current_batch_limit"]
    assert response.status_code == 200, response.text
    vectors = np.array([v["vector"] for v in response.json()["vectors"]])
    expected = FakeBackend(ModelKind.BI_ENCODER).embed_texts(texts)
    np.testing.assert_allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    assert limit <= 5
    messages = [r.getMessage() for r in caplog.records]
    ran = [batch for batch in backend.batches[1:] if len(batch) <= 5]  # after warm-up, not out of memory
    assert f"Processed 200 texts in {len(ran)} model batches" in messages
    assert any(re.match(r"batch size 32 -> \d+: out of memory on a batch of \d+", m) for m in messages)


def test_without_adaptive_batching_out_of_memory_fails_cleanly() -> None:
    backend = FakeBackend(ModelKind.BI_ENCODER, fail_when=oom_above(5))
    app = create_app(make_settings(batch_size=8, embedding_adaptive_batching=False), backend=backend)
    with ServerThread(app) as server, server.client() as client:
        body = {"batch_id": "b", "chunks": [{"chunk_id": str(i), "content": f"t{i}"} for i in range(20)]}
        response = client.post("/embed", json=body)
        assert response.status_code == 500
        assert response.json()["error"] == {
            "type": "backend_error",
            "message": "model batch failed (MemoryError)",
        }
        small = client.post(
            "/embed", json={"batch_id": "s", "chunks": [{"chunk_id": "a", "content": "fine"}]}
        )
        assert small.status_code == 200
        assert client.get("/health").json()["controller"]["current_batch_limit"] == 8


def test_sizer_shrinks_on_memory_pressure_and_grows_back() -> None:
    used = [100]
    sizer = BatchSizer(
        initial=32, maximum=64, adaptive=True, memory_limit_bytes=1000, memory_probe=lambda: used[0]
    )
    used[0] = 1200
    sizer.after_batch(32)
    assert sizer.limit == 16
    used[0] = 100
    for _ in range(8):
        sizer.after_batch(16)
    assert sizer.limit == 24
    fixed = BatchSizer(
        initial=32, maximum=64, adaptive=False, memory_limit_bytes=1000, memory_probe=lambda: 5000
    )
    fixed.after_batch(32)
    assert fixed.limit == 32
    assert not fixed.after_out_of_memory(32, MemoryError())


def test_too_many_texts_is_413_with_the_limit() -> None:
    app = create_app(make_settings(max_texts_per_embed_request=3), backend=FakeBackend(ModelKind.BI_ENCODER))
    with ServerThread(app) as server, server.client() as client:
        body = {"batch_id": "b", "chunks": [{"chunk_id": str(i), "content": "x"} for i in range(4)]}
        response = client.post("/embed", json=body)
        openai_shape = client.post("/v1/embeddings", json={"input": ["x"] * 4})
    for refused in (response, openai_shape):
        assert refused.status_code == 413
        assert "MAX_TEXTS_PER_EMBED_REQUEST=3" in refused.json()["error"]["message"]


def test_cross_encoder_refuses_to_embed_and_says_what_it_can_do() -> None:
    app = create_app(make_settings(), backend=FakeBackend(ModelKind.CROSS_ENCODER))
    with ServerThread(app) as server, server.client() as client:
        embed = client.post("/embed", json={"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "x"}]})
        openai_shape = client.post("/v1/embeddings", json={"input": "x"})
        capabilities = client.get("/health").json()["model"]["capabilities"]
    for refused in (embed, openai_shape):
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "unsupported_operation"
        assert "cannot embed" in refused.json()["error"]["message"]
    assert capabilities == ["rerank"]


def test_a_grown_limit_that_is_slower_per_token_goes_back_and_stays() -> None:
    """A CPU whose caches 48-item batches overflow: 10% more time per token than at 32."""
    sizer = BatchSizer(
        initial=32, maximum=64, adaptive=True, memory_limit_bytes=10**12, memory_probe=lambda: 1
    )
    for _ in range(8):
        sizer.after_batch(32, seconds_per_token=1.0e-5)
    assert sizer.limit == 48  # room in memory: try bigger batches
    for _ in range(8):
        sizer.after_batch(48, seconds_per_token=1.1e-5)
    assert sizer.limit == 32  # measured slower: back
    for _ in range(40):
        sizer.after_batch(32, seconds_per_token=1.0e-5)
    assert sizer.limit == 32  # and never tried again
    faster = BatchSizer(
        initial=32, maximum=64, adaptive=True, memory_limit_bytes=10**12, memory_probe=lambda: 1
    )
    for size, cost in [(32, 1.0e-5)] * 8 + [(48, 0.9e-5)] * 8:
        faster.after_batch(size, seconds_per_token=cost)
    assert faster.limit == 64  # a GPU: bigger batches cheaper per token keep growing
