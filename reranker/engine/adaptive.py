"""How many items the next batch may hold: adaptive under memory pressure.

The limit starts at BATCH_SIZE. While the process stays well under its memory
limit and batches keep filling up, it grows (up to EMBEDDING_MAX_BATCH_SIZE);
when memory goes over the limit, or a batch fails with an out-of-memory error,
it halves, and the failed batch's items go back into the queue (nothing lost).
Every change is logged with its reason. With adaptation off the limit is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)

GROW_AFTER_FULL_BATCHES = 8
GROW_BELOW_FRACTION = 0.8  # grow only while memory is under 80% of the limit
GIB = 1024**3


def process_rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or a runtime error that says so."""
    if isinstance(error, MemoryError) or "OutOfMemory" in type(error).__name__:
        return True
    return "out of memory" in str(error).lower()


class BatchSizer:
    def __init__(
        self,
        initial: int,
        maximum: int,
        adaptive: bool,
        memory_limit_bytes: int,
        memory_probe: Callable[[], int] = process_rss_bytes,
    ) -> None:
        self.maximum = max(1, maximum) if adaptive else max(1, initial)
        self.limit = max(1, min(initial, self.maximum))
        self.adaptive = adaptive
        self.memory_limit_bytes = memory_limit_bytes
        self._probe = memory_probe
        self._full_streak = 0
        self._failed_at: int | None = None  # the smallest batch that ran out of memory
        log.info(
            "Memory limit set to %.1f GB; batch size %d (%s, max %d)",
            memory_limit_bytes / GIB,
            self.limit,
            "adaptive" if adaptive else "fixed",
            self.maximum,
        )

    def after_batch(self, items: int) -> None:
        """Called after every successful batch with its size."""
        if not self.adaptive:
            return
        used = self._probe()
        if used > self.memory_limit_bytes:
            self._set(
                max(1, self.limit // 2),
                f"memory {used / GIB:.2f} GB is over the limit of {self.memory_limit_bytes / GIB:.2f} GB",
            )
            return
        self._full_streak = self._full_streak + 1 if items >= self.limit else 0
        ceiling = self.maximum if self._failed_at is None else min(self.maximum, self._failed_at - 1)
        if (
            self._full_streak >= GROW_AFTER_FULL_BATCHES
            and self.limit < ceiling
            and used < GROW_BELOW_FRACTION * self.memory_limit_bytes
        ):
            self._set(
                min(ceiling, self.limit + max(1, self.limit // 2)),
                f"{GROW_AFTER_FULL_BATCHES} full batches in a row with memory at {used / GIB:.2f} GB",
            )

    def after_out_of_memory(self, items: int, error: BaseException) -> bool:
        """A batch of ``items`` ran out of memory; True if a smaller retry makes sense."""
        if not self.adaptive or items <= 1:
            return False
        self._failed_at = min(items, self._failed_at or items)  # never grow back to it
        self._set(max(1, min(self.limit, items) // 2), f"out of memory on a batch of {items}: {error!r}")
        return True

    def _set(self, new_limit: int, reason: str) -> None:
        self._full_streak = 0
        if new_limit != self.limit:
            level = logging.WARNING if new_limit < self.limit else logging.INFO  # shrinking is trouble
            log.log(level, "batch size %d -> %d: %s", self.limit, new_limit, reason)
            self.limit = new_limit
