"""Counters, histograms and a recent-latency window: what GET /metrics shows, as JSON or Prometheus.

The window gives this instance's exact recent percentiles; the histograms (fixed
buckets, counts since start) are what can be summed across instances
(aggregate_metrics.py) and what Prometheus scrapes, since percentiles themselves
cannot be averaged. Both views of /metrics read these same objects.
Only touched from the event loop thread, so no locks are needed.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Sequence

import numpy as np

from reranker.engine.adaptive import process_rss_bytes

LATENCY_WINDOW = 2048
# Upper bounds of the buckets; one more bucket counts everything above the last.
LATENCY_BUCKETS_MS = (
    1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500, 750,
    1000, 1500, 2000, 3000, 5000, 7500, 10000, 20000, 30000, 60000,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
# Every failure reason, so each counter exists (at 0) before the first request.
FAILURE_REASONS = (
    "invalid_request", "malformed_request", "payload_too_large", "body_timeout", "unauthorized",
    "unsupported_operation", "overloaded", "not_ready", "timeout", "backend_error",
    "internal_error", "not_found", "too_many_jobs", "unsupported_media_type", "job_store_unavailable",
    "job_spec_unsupported", "model_not_found",
)  # fmt: skip
CLIENT_DISCONNECTED = "client_disconnected"  # the client's doing, not ours: counted apart


class Histogram:
    """Counts per bucket (``le`` upper bounds, plus one overflow bucket) and the sum."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict[str, object]:
        return {"le": list(self.bounds), "counts": list(self.counts), "sum": round(self.sum, 3)}


class Metrics:
    def __init__(self) -> None:
        self.started_at = time.monotonic()
        self.total_requests = 0
        self.successful_requests = 0
        self.failed_requests: Counter[str] = Counter({reason: 0 for reason in FAILURE_REASONS})
        self.rejected_requests = 0
        self.client_errors = 0  # 4xx: the request was wrong (a typo, a missing key): not the server's failure
        self.server_errors = 0  # 5xx: the server could not serve a valid request (503 refusals included)
        self.client_disconnects = 0
        self.memory_trims = 0  # times freed memory was handed back after a burst of work
        self.requests_by_endpoint: Counter[str] = Counter()
        self.responses: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status)
        self.items_processed = 0
        self.batches_run = 0
        self.batch_seconds = 0.0
        self.real_tokens = 0
        self.padded_tokens = 0  # longest item x items, summed over batches
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.latency_ms = Histogram(LATENCY_BUCKETS_MS)  # successful inference requests, end to end
        self.queue_wait_ms = Histogram(LATENCY_BUCKETS_MS)  # per model-served request
        self.inference_ms = Histogram(LATENCY_BUCKETS_MS)
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)  # per batch
        self.batch_tokens = Histogram(BATCH_TOKEN_BUCKETS)  # padded tokens per batch

    @classmethod
    def combined(cls, parts: Sequence[Metrics]) -> Metrics:
        """One view of several models' metrics: counts and histograms summed, windows joined."""
        total = cls()
        total.started_at = min(part.started_at for part in parts)
        for part in parts:
            for name in (
                "total_requests", "successful_requests", "rejected_requests", "client_disconnects",
                "client_errors", "server_errors",
                "memory_trims", "items_processed", "batches_run", "batch_seconds", "real_tokens",
                "padded_tokens",
            ):  # fmt: skip
                setattr(total, name, getattr(total, name) + getattr(part, name))
            total.failed_requests.update(part.failed_requests)
            total.requests_by_endpoint.update(part.requests_by_endpoint)
            total.responses.update(part.responses)
            total._latencies_ms.extend(part._latencies_ms)
            for name in ("latency_ms", "queue_wait_ms", "inference_ms", "batch_size", "batch_tokens"):
                mine, theirs = getattr(total, name), getattr(part, name)
                mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts, strict=True)]
                mine.sum += theirs.sum
        return total

    def expect_endpoints(self, endpoints: Sequence[str]) -> None:
        """Create the per-endpoint counters at 0, so they exist before the first request."""
        for endpoint in endpoints:
            self.requests_by_endpoint[endpoint] += 0
            self.responses[(endpoint, 200)] += 0

    def record_request(
        self,
        endpoint: str,
        failure_reason: str | None,
        latency_ms: float,
        status: int = 200,
        timed: bool = True,
    ) -> None:
        """One finished request; ``failure_reason`` is None on success. ``timed`` False (a job
        route): its duration stays out of the latency window and histogram."""
        self.total_requests += 1
        self.requests_by_endpoint[endpoint] += 1
        self.responses[(endpoint, status)] += 1
        if failure_reason == CLIENT_DISCONNECTED:
            self.client_disconnects += 1
        elif failure_reason is None:
            self.successful_requests += 1
            if timed:
                self._latencies_ms.append(latency_ms)
                self.latency_ms.observe(latency_ms)
        else:
            self.failed_requests[failure_reason] += 1
            if failure_reason == "overloaded":
                self.rejected_requests += 1
            if status >= 500:
                self.server_errors += 1
            else:
                self.client_errors += 1

    def record_timing(self, queue_ms: float, inference_ms: float) -> None:
        """Where a request that reached the model spent its time."""
        self.queue_wait_ms.observe(queue_ms)
        self.inference_ms.observe(inference_ms)

    def record_batch(self, lengths: list[int], seconds: float) -> None:
        self.batches_run += 1
        self.items_processed += len(lengths)
        self.batch_seconds += seconds
        self.real_tokens += sum(lengths)
        padded = max(lengths, default=0) * len(lengths)
        self.padded_tokens += padded
        self.batch_size.observe(len(lengths))
        self.batch_tokens.observe(padded)

    def success_rate(self) -> float:
        """Served among the requests the server could serve: a client's 4xx (a typo, a bad key) is
        not the server's failure and stays out; 5xx (503 refusals included) count against it."""
        served = self.successful_requests + self.server_errors
        return round(self.successful_requests / served, 6) if served else 1.0

    def items_per_second(self) -> float:
        """Model throughput while busy (items per second of batch time)."""
        return self.items_processed / self.batch_seconds if self.batch_seconds > 0 else 0.0

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    def snapshot(self) -> dict[str, object]:
        latencies = np.fromiter(self._latencies_ms, dtype=np.float64)
        percentiles = (
            {f"p{q}": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)}
            if latencies.size
            else {"p50": None, "p95": None, "p99": None}
        )
        return {
            "total_requests": self.total_requests,
            "successful_requests": self.successful_requests,
            "failed_requests": {reason: n for reason, n in self.failed_requests.items() if n},
            "rejected_requests": self.rejected_requests,
            "client_disconnects": self.client_disconnects,
            "client_errors": self.client_errors,
            "server_errors": self.server_errors,
            "success_rate": self.success_rate(),
            "requests_by_endpoint": dict(self.requests_by_endpoint),
            "responses_by_status": {
                f"{endpoint} {status}": n for (endpoint, status), n in sorted(self.responses.items()) if n
            },
            "latency_ms": {**percentiles, "window": int(latencies.size)},
            "latency_histogram_ms": self.latency_ms.snapshot(),
            "queue_wait_histogram_ms": self.queue_wait_ms.snapshot(),
            "inference_histogram_ms": self.inference_ms.snapshot(),
            "batch_size_histogram": self.batch_size.snapshot(),
            "batch_tokens_histogram": self.batch_tokens.snapshot(),
            "items_processed": self.items_processed,
            "batches_run": self.batches_run,
            "mean_batch_size": (
                round(self.items_processed / self.batches_run, 3) if self.batches_run else 0.0
            ),
            "model_busy_s": round(self.batch_seconds, 3),
            "items_per_busy_second": round(self.items_per_second(), 1),
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "padding_efficiency": (
                round(self.real_tokens / self.padded_tokens, 4) if self.padded_tokens else 1.0
            ),
            "rss_bytes": process_rss_bytes(),
            "memory_trims": self.memory_trims,
            "uptime_s": round(self.uptime_s(), 3),
        }
