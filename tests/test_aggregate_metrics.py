"""aggregate_metrics.py merges latency histograms instead of averaging percentiles."""

from __future__ import annotations

import json

import pytest

import aggregate_metrics
from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.metrics import LATENCY_BUCKETS_MS, Metrics
from tests.conftest import make_settings
from tests.scripts import free_ports
from tests.server import ServerThread


def snapshot_with(latencies_ms: list[float]) -> dict:
    metrics = Metrics()
    for latency in latencies_ms:
        metrics.record_request("rerank", None, latency)
    return metrics.snapshot()


def test_cluster_percentiles_come_from_the_merged_histogram() -> None:
    fast = snapshot_with([0.5] * 100)  # every request in the (0, 1] ms bucket
    slow = snapshot_with([450.0] * 100)  # every request in the (400, 500] ms bucket
    report = aggregate_metrics.aggregate({"a": fast, "b": slow, "c": None})["cluster"]
    assert report["total_requests"] == 200 and report["instances_answering"] == 2
    # rank 100 of 200 ends the first bucket; rank 190 is 90% into the (400, 500] bucket.
    assert report["latency_ms"]["p50"] == 1.0
    assert report["latency_ms"]["p95"] == 490.0
    averaged_p95 = (fast["latency_ms"]["p95"] + slow["latency_ms"]["p95"]) / 2
    assert averaged_p95 < 300  # what averaging would have claimed


def test_histogram_percentile_edges() -> None:
    bounds = list(LATENCY_BUCKETS_MS)
    empty = [0] * (len(bounds) + 1)
    assert aggregate_metrics.histogram_percentile(bounds, empty, 95) is None
    overflow = empty.copy()
    overflow[-1] = 5
    assert aggregate_metrics.histogram_percentile(bounds, overflow, 50) == float(bounds[-1])


def test_buckets_are_inclusive_upper_bounds() -> None:
    histogram = snapshot_with([5.0, 5.0001])["latency_histogram_ms"]
    assert histogram["counts"][LATENCY_BUCKETS_MS.index(5)] == 1
    assert histogram["counts"][LATENCY_BUCKETS_MS.index(10)] == 1


def test_protected_metrics_need_the_key_and_a_refusal_is_reported_as_401_not_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = {"api_keys": "s3cret", "protect_metrics": True}
    app = create_app(make_settings(**keys), backend=FakeBackend(ModelKind.CROSS_ENCODER))
    down = f"http://127.0.0.1:{free_ports(1)}"
    with ServerThread(app) as server:
        assert aggregate_metrics.main([server.url, down], environ={}) == 1
        out = capsys.readouterr().out
        assert "unauthorized (401): /metrics needs an API key; pass --api-key KEY" in out
        assert f"{down}/metrics" in out and "unreachable" in out
        assert aggregate_metrics.main(["--api-key", "wrong", server.url], environ={}) == 1
        assert "the API key was refused" in capsys.readouterr().out
        assert aggregate_metrics.main(["--json", "--api-key", "s3cret", server.url]) == 0
        assert json.loads(capsys.readouterr().out)["cluster"]["instances_answering"] == 1
        assert aggregate_metrics.main([server.url], environ={"RERANKER_API_KEY": "s3cret"}) == 0
