"""The default server on a CPU machine without native half precision (AVX2, no AMX) that has
every optional runtime installed (what ./run_tests.sh leaves in .venv): BACKEND=auto and
DTYPE=auto serve float32 through ONNX Runtime, which equals sentence-transformers' own numbers,
and the same request gets the same answer alone, among 15 concurrent requests, and from
the prediction cache. The machine probe is injected, so this holds on any CPU (with AMX too)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.factory import create_backend
from reranker.backends.selection import Machine
from reranker.settings import Settings
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import make_settings
from tests.server import ServerThread

CPU_WITH_EVERY_RUNTIME = Machine(
    cuda=False, mps=False, apple_silicon=False, mlx=True, arch="x86_64", cpu_flags=frozenset({"avx2"})
)
REQUEST = {"query": QUERY, "documents": TEXTS}
ITEMS = len(TEXTS) + 1  # a bi-encoder embeds the query and every document
CACHE_SIZE = 64
# Batches cut in arrival order, 64 items each (two requests' worth), after waiting for the
# rest of a burst: a request of a burst shares its batches with other requests' texts,
# padded to their lengths.
BATCHING = {
    "batch_size": 64,
    "embedding_max_batch_size": 64,
    "batch_wait_ms": 500,
    "batch_length_grouping": False,
}


def comparable_settings(**values: Any) -> Settings:
    """Settings for ``same_request_three_ways``: a small cache, batches shared between requests."""
    cache = {"enable_prediction_cache": True, "prediction_cache_size": CACHE_SIZE}
    return make_settings(**cache, **BATCHING, **values)


def other_request(k: int) -> dict[str, Any]:
    """Request ``k`` of the burst: other texts, of mixed lengths, none of them cached."""
    documents = [f"{TEXTS[(i + k) % len(TEXTS)]} " * (1 + (i + k) % 3) + str(k) for i in range(len(TEXTS))]
    return {"query": f"{QUERY} ({k})", "documents": documents}


def post_together(server: ServerThread, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Every body posted to /rerank at the same moment, one client per request."""
    start = threading.Barrier(len(bodies))

    def post(body: dict[str, Any]) -> httpx.Response:
        with server.client() as client:
            start.wait()
            return client.post("/rerank", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def scores(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    results = sorted(response.json()["results"], key=lambda r: r["index"])
    return np.array([r["score"] for r in results], dtype=np.float64)


def evict(client: httpx.Client, tag: str) -> None:
    """Fill the cache with new texts, so that nothing cached before is left."""
    fillers = [f"filler text number {i} {tag}" for i in range(CACHE_SIZE)]
    assert client.post("/v1/embeddings", json={"input": fillers}).status_code == 200


def same_request_three_ways(server: ServerThread) -> dict[str, np.ndarray]:
    """The scores of REQUEST computed alone, then answered from the cache, then (cache evicted)
    computed again in batches shared with 15 other concurrent requests."""
    with server.client() as client:
        evict(client, "before")
        alone = client.post("/rerank", json=REQUEST)
        cached = client.post("/rerank", json=REQUEST)
        evict(client, "after")
    together = post_together(server, [REQUEST, *(other_request(k) for k in range(1, 16))])
    assert (alone.headers["x-cache-hits"], cached.headers["x-cache-hits"]) == ("0", str(ITEMS))
    assert int(alone.headers["x-batch-size"]) == ITEMS  # alone: its own items only
    first = together[0]
    assert first.headers["x-cache-hits"] == "0", "evicted: computed again"
    assert int(first.headers["x-batch-size"]) > ITEMS, "it shared a batch with other requests"
    assert all(response.status_code == 200 for response in together)
    return {"alone": scores(alone), "cached": scores(cached), "among 15 others": scores(first)}


@pytest.fixture(scope="module")
def default_server(onnx_cache: Path) -> Iterator[ServerThread]:
    settings = comparable_settings(backend="auto", dtype="auto", onnx_cache_dir=str(onnx_cache))
    app = create_app(settings, backend_factory=lambda s: create_backend(s, machine=CPU_WITH_EVERY_RUNTIME))
    with ServerThread(app) as server:
        assert server.runtime.status.value == "healthy", server.runtime.error
        yield server


def test_auto_serves_onnx_fp32_and_says_why(default_server: ServerThread) -> None:
    with default_server.client() as client:
        model = client.get("/health").json()["model"]
    assert (model["backend"], model["device"], model["dtype"]) == ("onnx", "cpu", "float32")
    assert model["selected_because"].startswith(
        "auto: CPU only; float32 (no native half precision on this CPU: no amx_bf16); "
        "ONNX Runtime: within 1e-05 of torch (largest difference "
    )


def test_scores_and_vectors_equal_sentence_transformers(
    default_server: ServerThread, sentence_transformer
) -> None:
    vectors = sentence_transformer.encode([QUERY, *TEXTS], normalize_embeddings=True)
    with default_server.client() as client:
        served = scores(client.post("/rerank", json=REQUEST))
        embedded = client.post("/v1/embeddings", json={"input": [QUERY, *TEXTS]}).json()["data"]
    np.testing.assert_allclose(served, vectors[1:] @ vectors[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose([e["embedding"] for e in embedded], vectors, rtol=0, atol=1e-5)


def test_the_answer_does_not_depend_on_batch_company_or_the_cache(default_server: ServerThread) -> None:
    answers = same_request_three_ways(default_server)
    for way, got in answers.items():
        np.testing.assert_allclose(got, answers["alone"], rtol=0, atol=1e-6, err_msg=way)
