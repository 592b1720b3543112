"""Counters, a recent-latency window and a latency histogram behind GET /metrics.

The window gives this instance's exact recent percentiles; the histogram (fixed
buckets, counts since start) is what can be summed across instances
(aggregate_metrics.py), since percentiles themselves cannot be averaged.
Only touched from the event loop thread, so no locks are needed.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque

import numpy as np

LATENCY_WINDOW = 2048
# Upper bounds (ms) of the latency histogram buckets; one more bucket counts everything slower.
LATENCY_BUCKETS_MS = (
    1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500, 750,
    1000, 1500, 2000, 3000, 5000, 7500, 10000, 20000, 30000, 60000,
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.started_at = time.monotonic()
        self.total_requests = 0
        self.successful_requests = 0
        self.failed_requests: Counter[str] = Counter()
        self.rejected_requests = 0
        self.requests_by_endpoint: Counter[str] = Counter()
        self.items_processed = 0
        self.batches_run = 0
        self.batch_seconds = 0.0
        self.real_tokens = 0
        self.padded_tokens = 0  # longest item x items, summed over batches
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._latency_counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._latency_sum_ms = 0.0

    def record_request(self, endpoint: str, failure_reason: str | None, latency_ms: float) -> None:
        """One finished inference request; ``failure_reason`` is None on success."""
        self.total_requests += 1
        self.requests_by_endpoint[endpoint] += 1
        if failure_reason is None:
            self.successful_requests += 1
            self._latencies_ms.append(latency_ms)
            self._latency_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
            self._latency_sum_ms += latency_ms
        else:
            self.failed_requests[failure_reason] += 1
            if failure_reason == "overloaded":
                self.rejected_requests += 1

    def record_batch(self, lengths: list[int], seconds: float) -> None:
        self.batches_run += 1
        self.items_processed += len(lengths)
        self.batch_seconds += seconds
        self.real_tokens += sum(lengths)
        self.padded_tokens += max(lengths, default=0) * len(lengths)

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
            "failed_requests": dict(self.failed_requests),
            "rejected_requests": self.rejected_requests,
            "success_rate": (
                round(self.successful_requests / self.total_requests, 6) if self.total_requests else 1.0
            ),
            "requests_by_endpoint": dict(self.requests_by_endpoint),
            "latency_ms": {**percentiles, "window": int(latencies.size)},
            "latency_histogram_ms": {
                "le": list(LATENCY_BUCKETS_MS),
                "counts": list(self._latency_counts),  # per bucket; the last is "slower than all"
                "sum": round(self._latency_sum_ms, 3),
            },
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
            "uptime_s": round(self.uptime_s(), 3),
        }
