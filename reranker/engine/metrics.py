"""Counters and a recent-latency window behind GET /metrics.

Only touched from the event loop thread, so no locks are needed.
"""

from __future__ import annotations

import time
from collections import Counter, deque

import numpy as np

LATENCY_WINDOW = 2048


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

    def record_request(self, endpoint: str, failure_reason: str | None, latency_ms: float) -> None:
        """One finished inference request; ``failure_reason`` is None on success."""
        self.total_requests += 1
        self.requests_by_endpoint[endpoint] += 1
        if failure_reason is None:
            self.successful_requests += 1
            self._latencies_ms.append(latency_ms)
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
            "items_processed": self.items_processed,
            "batches_run": self.batches_run,
            "mean_batch_size": (
                round(self.items_processed / self.batches_run, 3) if self.batches_run else 0.0
            ),
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "padding_efficiency": (
                round(self.real_tokens / self.padded_tokens, 4) if self.padded_tokens else 1.0
            ),
            "uptime_s": round(self.uptime_s(), 3),
        }
