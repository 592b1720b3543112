"""The prediction cache: hits cost no model time, answers equal computed ones, stats are honest."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.cache import CachedOutput, PredictionCache
from tests.conftest import make_settings
from tests.server import ServerThread

DOCS = ["red apples grow on trees", "the sea is blue and deep", "apples and pears are fruit"]


def cached_server(kind: ModelKind) -> ServerThread:
    settings = make_settings(enable_prediction_cache=True, prediction_cache_size=100)
    return ServerThread(create_app(settings, backend=FakeBackend(kind)))


@pytest.fixture
def cross_server() -> Iterator[ServerThread]:
    with cached_server(ModelKind.CROSS_ENCODER) as server:
        yield server


def test_repeated_rerank_is_answered_from_the_cache_without_model_work(cross_server: ServerThread) -> None:
    backend = cross_server.runtime.backend
    body = {"query": "apples", "documents": DOCS}
    with cross_server.client() as client:
        first = client.post("/rerank", json=body)
        batches_after_first = len(backend.batches)
        second = client.post("/rerank", json=body)
        assert len(backend.batches) == batches_after_first  # nothing reached the model
        assert second.json()["results"] == first.json()["results"]
        assert second.headers["x-cache-hits"] == "3" and second.headers["x-batch-size"] == "0"
        assert float(second.headers["x-inference-time-ms"]) == 0.0
        assert first.headers["x-cache-hits"] == "0" and first.headers["x-batch-size"] == "3"

        # One new document among known ones: only that pair is computed.
        mixed = client.post("/rerank", json={"query": "apples", "documents": [*DOCS, "pears are green"]})
        assert backend.batches[-1] == [4]  # "apples" + "pears are green"
        assert mixed.headers["x-cache-hits"] == "3"
        fresh = {r["index"]: r["score"] for r in mixed.json()["results"]}
        assert [fresh[r["index"]] for r in first.json()["results"]] == [
            r["score"] for r in first.json()["results"]
        ]

        cache = client.get("/metrics").json()["cache"]
        assert (cache["hits"], cache["misses"], cache["size"]) == (6, 4, 4)
        assert cache["hit_rate"] == 0.6
        assert client.get("/health").json()["cache"]["enabled"] is True


def test_same_document_under_another_query_is_a_different_entry(cross_server: ServerThread) -> None:
    with cross_server.client() as client:
        client.post("/rerank", json={"query": "apples", "documents": DOCS})
        other = client.post("/rerank", json={"query": "the sea", "documents": DOCS})
    assert other.headers["x-cache-hits"] == "0"


def test_cached_vectors_serve_every_request_option() -> None:
    with cached_server(ModelKind.BI_ENCODER) as server, server.client() as client:
        chunks = [{"chunk_id": str(i), "content": text} for i, text in enumerate(DOCS)]
        raw = client.post("/embed", json={"batch_id": "b1", "chunks": chunks, "normalize": False}).json()
        normalized = client.post("/v1/embeddings", json={"input": DOCS, "model": "fake"})
        assert normalized.headers["x-cache-hits"] == "3"
        rerank = client.post("/rerank", json={"query": DOCS[0], "documents": DOCS[1:]})
        assert rerank.headers["x-cache-hits"] == "3"
        # The bi-encoder rerank shares the text entries with /embed.
    vectors = np.array([row["vector"] for row in raw["vectors"]], dtype=np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    got = np.array([row["embedding"] for row in normalized.json()["data"]])
    np.testing.assert_allclose(got, unit, atol=1e-6)
    scores = sorted((r["index"], r["score"]) for r in rerank.json()["results"])
    np.testing.assert_allclose([s for _, s in scores], unit[1:] @ unit[0], atol=1e-6)


def test_disabled_cache_reports_so_and_recomputes() -> None:
    backend = FakeBackend(ModelKind.CROSS_ENCODER)
    with ServerThread(create_app(make_settings(), backend=backend)) as server, server.client() as client:
        for _ in range(2):
            response = client.post("/rerank", json={"query": "apples", "documents": DOCS})
            assert response.headers["x-cache-hits"] == "0"
        assert client.get("/metrics").json()["cache"] == {"enabled": False}
    assert sum(len(batch) for batch in backend.batches[1:]) == 6  # after the warm-up batch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(value: float) -> CachedOutput:
    return CachedOutput(np.float32(value), tokens=3, truncated=False)


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = PredictionCache("m", max_entries=10, ttl_s=60, timer=clock)
    key = cache.key("text", "hello")
    cache.put(key, entry(1.0))
    clock.now = 59.0
    assert 0 in cache.get_many([key])
    clock.now = 61.0
    assert cache.get_many([key]) == {}
    assert (cache.hits, cache.misses) == (1, 1)


def test_least_recently_used_entry_goes_first_when_full() -> None:
    cache = PredictionCache("m", max_entries=2, ttl_s=0)
    a, b, c = (cache.key("text", t) for t in "abc")
    cache.put(a, entry(1))
    cache.put(b, entry(2))
    cache.get_many([a])  # a is now more recent than b
    cache.put(c, entry(3))
    assert sorted(cache.get_many([a, b, c])) == [0, 2]


def test_keys_separate_models_kinds_and_text_boundaries() -> None:
    one, two = PredictionCache("model-a", 10, 0), PredictionCache("model-b", 10, 0)
    assert one.key("text", "x") != two.key("text", "x")
    assert one.key("pair", "ab", "c") != one.key("pair", "a", "bc")
    assert one.key("text", "q") != one.key("pair", "q")


def test_real_model_cached_scores_equal_in_process_scores(
    sentence_transformer, serving_backend: dict[str, str]
) -> None:
    query = "how long does a broken bone take to heal"
    documents = ["Bones heal in six to eight weeks.", "Paris is in France.", "Rest helps a fracture heal."]
    vectors = sentence_transformer.encode([query, *documents], normalize_embeddings=True)
    expected = vectors[1:] @ vectors[0]
    settings = make_settings(enable_prediction_cache=True, **serving_backend)
    with ServerThread(create_app(settings)) as server, server.client() as client:
        answers = [client.post("/rerank", json={"query": query, "documents": documents}) for _ in range(2)]
    assert [a.headers["x-cache-hits"] for a in answers] == ["0", "4"]
    for answer in answers:
        scores = sorted((r["index"], r["score"]) for r in answer.json()["results"])
        np.testing.assert_allclose([s for _, s in scores], expected, atol=1e-5)
