"""GET /metrics in the Prometheus text format: a collector over the same counters as the JSON.

Nothing is counted twice: at scrape time the collector reads ``Metrics``, the
controller's queue and the cache, so both views always agree. Every series exists
from start (zeros before the first request). Plus prometheus_client's process metrics
(resident memory, CPU seconds, open files).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from reranker.engine.metrics import Histogram
from reranker.engine.runtime import Runtime, Status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def prometheus_registry(runtime: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class RuntimeCollector:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime
        metrics = runtime.metrics
        requests = CounterMetricFamily(
            "reranker_requests",
            "Inference requests by endpoint and HTTP status.",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), count in sorted(metrics.responses.items()):
            requests.add_metric([endpoint, str(status)], count)
        yield requests
        failures = CounterMetricFamily(
            "reranker_request_failures", "Failed inference requests by reason.", labels=["reason"]
        )
        for reason, count in sorted(metrics.failed_requests.items()):
            failures.add_metric([reason], count)
        yield failures
        yield CounterMetricFamily(
            "reranker_client_disconnects",
            "Requests whose client went away before the answer (not failures of the server).",
            value=metrics.client_disconnects,
        )
        yield _histogram(
            "reranker_request_duration_seconds",
            "Successful inference requests, end to end (job routes excluded).",
            metrics.latency_ms,
            1e-3,
        )
        yield _histogram(
            "reranker_queue_wait_seconds", "Time requests waited for the model.", metrics.queue_wait_ms, 1e-3
        )
        yield _histogram(
            "reranker_inference_seconds",
            "Model time of the batches a request rode in.",
            metrics.inference_ms,
            1e-3,
        )
        yield _histogram("reranker_batch_size", "Items per model batch.", metrics.batch_size)
        yield _histogram("reranker_batch_tokens", "Padded tokens per model batch.", metrics.batch_tokens)
        controller = runtime.controller
        yield GaugeMetricFamily(
            "reranker_queue_depth",
            "Requests waiting for the model.",
            value=controller.queued if controller else 0,
        )
        yield GaugeMetricFamily(
            "reranker_in_flight_batches",
            "Model batches running now.",
            value=controller.in_flight if controller else 0,
        )
        yield CounterMetricFamily(
            "reranker_items_processed", "Texts or pairs run through the model.", value=metrics.items_processed
        )
        yield CounterMetricFamily("reranker_batches", "Model batches run.", value=metrics.batches_run)
        yield CounterMetricFamily(
            "reranker_model_busy_seconds",
            "Time the model spent running batches.",
            value=metrics.batch_seconds,
        )
        yield CounterMetricFamily(
            "reranker_tokens", "Real tokens run through the model.", value=metrics.real_tokens
        )
        yield CounterMetricFamily(
            "reranker_padded_tokens", "Tokens including padding.", value=metrics.padded_tokens
        )
        cache = runtime.cache_stats()
        yield CounterMetricFamily(
            "reranker_cache_hits", "Prediction cache hits.", value=int(cache.get("hits") or 0)
        )
        yield CounterMetricFamily(
            "reranker_cache_misses", "Prediction cache misses.", value=int(cache.get("misses") or 0)
        )
        yield GaugeMetricFamily(
            "reranker_cache_entries", "Prediction cache entries.", value=int(cache.get("size") or 0)
        )
        yield GaugeMetricFamily(
            "reranker_ready", "1 when the server takes work.", value=int(runtime.status is Status.HEALTHY)
        )
        yield GaugeMetricFamily("reranker_uptime_seconds", "Seconds since start.", value=metrics.uptime_s())
        info = runtime.model_info()
        model = GaugeMetricFamily(
            "reranker_model_info",
            "The model served (value 1).",
            labels=["model", "kind", "backend", "device", "dtype"],
        )
        model.add_metric(
            [
                runtime.model_name(),
                *((info.kind.value, info.backend, info.device, info.dtype) if info else ("", "", "", "")),
            ],
            1,
        )
        yield model


def _histogram(name: str, documentation: str, histogram: Histogram, scale: float = 1.0) -> Metric:
    cumulative, buckets = 0, []
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else _number(bound * scale), cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum * scale)


def _number(value: float) -> str:
    return repr(round(value, 9))
