"""GET /metrics as Prometheus text: parses, exists from the start, moves with traffic, agrees with JSON."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.metrics import CLIENT_DISCONNECTED, FAILURE_REASONS
from reranker.errors import RerankerError
from tests.conftest import make_settings
from tests.server import ServerThread

ENDPOINTS = ("/rerank", "/v1/rerank", "/embed", "/v1/embeddings")


@pytest.fixture
def server() -> Iterator[ServerThread]:
    app = create_app(make_settings(max_documents_per_request=5), backend=FakeBackend(ModelKind.BI_ENCODER))
    with ServerThread(app) as running:
        yield running


def scrape(server: ServerThread, **kwargs: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the Prometheus exposition, by (name, sorted labels)."""
    with server.client() as client:
        response = client.get("/metrics", **kwargs)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample with these labels; its ``model`` label is this server's one model, "fake"."""
    if name not in ONE_SERIES_PER_SERVER:
        labels = {"model": "fake", **labels}
    return samples[(name, tuple(sorted(labels.items())))]


ONE_SERIES_PER_SERVER = {
    "reranker_ready", "reranker_uptime_seconds", "process_resident_memory_bytes",
    "reranker_jobs_finished_total", "reranker_jobs_active", "reranker_jobs_max_active",
}  # fmt: skip


def test_every_series_exists_before_the_first_request(server: ServerThread) -> None:
    samples = scrape(server, params={"format": "prometheus"})
    for endpoint in ENDPOINTS:
        assert value(samples, "reranker_requests_total", endpoint=endpoint, status="200") == 0
    for reason in ("invalid_request", "overloaded", "timeout", "backend_error", "unauthorized"):
        assert value(samples, "reranker_request_failures_total", reason=reason) == 0
    for histogram in ("request_duration_seconds", "queue_wait_seconds", "inference_seconds", "batch_size"):
        assert value(samples, f"reranker_{histogram}_count") == 0
        assert value(samples, f"reranker_{histogram}_bucket", le="+Inf") == 0
    assert value(samples, "reranker_queue_depth") == 0
    assert value(samples, "reranker_in_flight_batches") == 0
    assert value(samples, "reranker_ready") == 1
    info = value(
        samples,
        "reranker_model_info",
        model="fake",
        kind="bi-encoder",
        backend="fake",
        device="cpu",
        dtype="float32",
    )
    assert info == 1
    assert value(samples, "process_resident_memory_bytes") > 0


def test_counters_move_with_traffic_and_agree_with_the_json_view(server: ServerThread) -> None:
    with server.client() as client:
        for _ in range(3):
            ok = client.post("/rerank", json={"query": "apple", "documents": ["apple pie", "car", "pear"]})
            assert ok.status_code == 200
        assert client.post("/rerank", json={"query": "", "documents": ["a"]}).status_code == 422
        assert client.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200
        too_many = client.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 6})
        assert too_many.status_code == 422
        as_json = client.get("/metrics").json()
    samples = scrape(server, headers={"accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
    assert value(samples, "reranker_requests_total", endpoint="/rerank", status="200") == 3
    assert value(samples, "reranker_requests_total", endpoint="/rerank", status="422") == 1
    assert value(samples, "reranker_requests_total", endpoint="/v1/rerank", status="422") == 1
    assert value(samples, "reranker_requests_total", endpoint="/v1/embeddings", status="200") == 1
    assert value(samples, "reranker_request_failures_total", reason="invalid_request") == 2
    assert value(samples, "reranker_request_duration_seconds_count") == 4
    assert value(samples, "reranker_items_processed_total") == 3 * 4 + 2  # bi-encoder: query + documents
    assert value(samples, "reranker_batch_size_count") == value(samples, "reranker_batches_total")
    assert value(samples, "reranker_queue_wait_seconds_count") == 4
    # the same counters as the JSON view
    assert as_json["total_requests"] == 6 and as_json["failed_requests"] == {"invalid_request": 2}
    assert as_json["responses_by_status"]["/rerank 422"] == 1
    assert as_json["items_processed"] == value(samples, "reranker_items_processed_total")
    assert (
        as_json["latency_histogram_ms"]["counts"][-1] + sum(as_json["latency_histogram_ms"]["counts"][:-1])
        == 4
    )


def test_json_stays_the_default_and_a_bad_format_is_400(server: ServerThread) -> None:
    with server.client() as client:
        assert client.get("/metrics").headers["content-type"] == "application/json"
        assert client.get("/metrics", headers={"accept": "application/json"}).json()["status"] == "healthy"
        bad = client.get("/metrics", params={"format": "xml"})
    assert bad.status_code == 400 and "format" in bad.json()["error"]["message"]


def test_every_error_type_a_request_raises_is_a_failure_reason_from_the_start(server: ServerThread) -> None:
    """Issue 22: unsupported_media_type and job_store_unavailable had no series until they happened."""
    raised = {cls.error_type for cls in _subclasses(RerankerError)} - {"startup_error", CLIENT_DISCONNECTED}
    assert raised <= set(FAILURE_REASONS), raised - set(FAILURE_REASONS)
    samples = scrape(server, params={"format": "prometheus"})
    for reason in ("unsupported_media_type", "job_store_unavailable"):
        assert value(samples, "reranker_request_failures_total", reason=reason) == 0


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))}


def test_job_routes_are_counted_but_are_not_inference_latencies(server: ServerThread) -> None:
    """Issue 22: job polls, deletes and /runsync waits fed p50/p99 and request_duration_seconds."""
    job = {"type": "embed", "input": {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "hello"}]}}
    with server.client() as client:
        submitted = client.post("/v1/jobs", json=job)
        assert submitted.status_code == 202, submitted.text
        status_url = submitted.json()["status_url"]
        server.wait_until(lambda: client.get(status_url).json()["status"] == "COMPLETED", "job done", 30)
        assert client.delete(status_url).status_code == 200
        ran = client.post("/runsync", json={"input": job["input"]})
        assert ran.status_code == 200 and ran.json()["status"] == "COMPLETED", ran.text
        assert client.get(f"/status/{ran.json()['id']}").status_code == 200
        as_json = client.get("/metrics").json()
    samples = scrape(server, params={"format": "prometheus"})
    assert value(samples, "reranker_requests_total", endpoint="/v1/jobs/{job_id}", status="200") >= 2
    assert value(samples, "reranker_requests_total", endpoint="/runsync", status="200") == 1
    assert value(samples, "reranker_request_duration_seconds_count") == 0
    assert as_json["latency_ms"]["window"] == 0 and as_json["latency_ms"]["p99"] is None
    assert as_json["successful_requests"] == as_json["total_requests"]  # counted all the same
    # The jobs themselves: two finished here; none active, out of MAX_ACTIVE_JOBS.
    assert value(samples, "reranker_jobs_finished_total", status="COMPLETED") == 2
    assert value(samples, "reranker_jobs_finished_total", status="FAILED") == 0
    assert value(samples, "reranker_jobs_active") == 0
    assert value(samples, "reranker_jobs_max_active") == server.runtime.settings.max_active_jobs
