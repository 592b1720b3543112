"""GET /metrics in the Prometheus text format: a collector over the same counters as the JSON.

Nothing is counted twice: at scrape time the collector reads ``Metrics``, the
controller's queue and the cache, so both views always agree. Every series exists
from start (zeros before the first request). Plus prometheus_client's process metrics
(resident memory, CPU seconds, open files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from reranker.engine.metrics import Histogram
from reranker.engine.model import ServedModel
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
        """Every per-model series carries a ``model`` label (one value on a one-model server)."""
        runtime = self._runtime
        models = runtime.models
        label = ["model"]

        def counter(name: str, documentation: str, value: Callable[[ServedModel], float]) -> Metric:
            family = CounterMetricFamily(name, documentation, labels=label)
            for model in models:
                family.add_metric([model.name], value(model))
            return family

        def gauge(name: str, documentation: str, value: Callable[[ServedModel], float]) -> Metric:
            family = GaugeMetricFamily(name, documentation, labels=label)
            for model in models:
                family.add_metric([model.name], value(model))
            return family

        def histogram(
            name: str, documentation: str, of: Callable[[ServedModel], Histogram], scale: float = 1.0
        ) -> Metric:
            family = HistogramMetricFamily(name, documentation, labels=label)
            for model in models:
                buckets, total = _buckets(of(model), scale)
                family.add_metric([model.name], buckets, sum_value=total)
            return family

        requests = CounterMetricFamily(
            "reranker_requests",
            "Inference requests by endpoint and HTTP status.",
            labels=["endpoint", "status", "model"],
        )
        failures = CounterMetricFamily(
            "reranker_request_failures", "Failed inference requests by reason.", labels=["reason", "model"]
        )
        counted = [(model.name, model.metrics) for model in models]
        if len(models) > 1:  # refused before a model was chosen: model=""
            counted.append(("", runtime.unrouted))
        for name, metrics in counted:
            for (endpoint, status), count in sorted(metrics.responses.items()):
                requests.add_metric([endpoint, str(status), name], count)
            for reason, count in sorted(metrics.failed_requests.items()):
                failures.add_metric([reason, name], count)
        yield requests
        yield failures
        yield counter(
            "reranker_client_errors",
            "Requests refused for the client's mistake (4xx): not failures of the server.",
            lambda m: m.metrics.client_errors,
        )
        yield counter(
            "reranker_server_errors",
            "Valid requests the server failed to serve (5xx, 503 refusals included).",
            lambda m: m.metrics.server_errors,
        )
        yield counter(
            "reranker_client_disconnects",
            "Requests whose client went away before the answer (not failures of the server).",
            lambda m: m.metrics.client_disconnects,
        )
        yield histogram(
            "reranker_request_duration_seconds",
            "Successful inference requests, end to end (job routes excluded).",
            lambda m: m.metrics.latency_ms,
            1e-3,
        )
        yield histogram(
            "reranker_queue_wait_seconds",
            "Time requests waited for the model.",
            lambda m: m.metrics.queue_wait_ms,
            1e-3,
        )
        yield histogram(
            "reranker_inference_seconds",
            "Model time of the batches a request rode in.",
            lambda m: m.metrics.inference_ms,
            1e-3,
        )
        yield histogram("reranker_batch_size", "Items per model batch.", lambda m: m.metrics.batch_size)
        yield histogram(
            "reranker_batch_tokens", "Padded tokens per model batch.", lambda m: m.metrics.batch_tokens
        )
        yield gauge(
            "reranker_queue_depth",
            "Requests waiting for the model.",
            lambda m: sum(c.queued for c in m.controllers()),
        )
        yield gauge(
            "reranker_in_flight_batches",
            "Model batches running now.",
            lambda m: sum(c.in_flight for c in m.controllers()),
        )
        yield counter(
            "reranker_items_processed",
            "Texts or pairs run through the model.",
            lambda m: m.metrics.items_processed,
        )
        yield counter("reranker_batches", "Model batches run.", lambda m: m.metrics.batches_run)
        yield counter(
            "reranker_model_busy_seconds",
            "Time the model spent running batches.",
            lambda m: m.metrics.batch_seconds,
        )
        yield counter(
            "reranker_tokens", "Real tokens run through the model.", lambda m: m.metrics.real_tokens
        )
        yield counter(
            "reranker_padded_tokens", "Tokens including padding.", lambda m: m.metrics.padded_tokens
        )
        yield counter(
            "reranker_cache_hits", "Prediction cache hits.", lambda m: int(m.cache_stats().get("hits") or 0)
        )
        yield counter(
            "reranker_cache_misses",
            "Prediction cache misses.",
            lambda m: int(m.cache_stats().get("misses") or 0),
        )
        yield gauge(
            "reranker_cache_entries",
            "Prediction cache entries.",
            lambda m: int(m.cache_stats().get("size") or 0),
        )
        jobs = runtime.jobs
        finished = CounterMetricFamily(
            "reranker_jobs_finished",
            "Jobs this process's worker finished, by final status.",
            labels=["status"],
        )
        for status in ("COMPLETED", "FAILED", "CANCELLED"):
            finished.add_metric([status], jobs.finished[status])
        yield finished
        active = getattr(jobs, "active", None)
        if isinstance(active, int):  # the local store knows its backlog; Redis's is the cluster's
            yield GaugeMetricFamily("reranker_jobs_active", "Jobs queued or running here.", value=active)
            yield GaugeMetricFamily(
                "reranker_jobs_max_active",
                "MAX_ACTIVE_JOBS: more are refused.",
                value=runtime.settings.max_active_jobs,
            )
        yield GaugeMetricFamily(
            "reranker_ready", "1 when the server takes work.", value=int(runtime.status is Status.HEALTHY)
        )
        yield GaugeMetricFamily(
            "reranker_uptime_seconds", "Seconds since start.", value=runtime.default.metrics.uptime_s()
        )
        info_family = GaugeMetricFamily(
            "reranker_model_info",
            "The models served (value 1).",
            labels=["model", "kind", "backend", "device", "dtype"],
        )
        for model in models:
            info = model.info
            facts = (info.kind.value, info.backend, info.device, info.dtype) if info else ("", "", "", "")
            info_family.add_metric([model.name, *facts], 1)
        yield info_family


def _buckets(histogram: Histogram, scale: float) -> tuple[list[tuple[str, float]], float]:
    cumulative, buckets = 0, []
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else _number(bound * scale), cumulative))
    return buckets, histogram.sum * scale


def _number(value: float) -> str:
    return repr(round(value, 9))
