"""How many items the next batch may hold: adaptive under memory pressure.

The limit starts at BATCH_SIZE. While the process stays well under its memory
limit and batches keep filling up, it grows (up to EMBEDDING_MAX_BATCH_SIZE);
when memory goes over the limit, or a batch fails with an out-of-memory error,
it halves, and the failed batch's items go back into the queue (nothing lost).
Every change is logged with its reason. With adaptation off the limit is fixed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)

GROW_AFTER_FULL_BATCHES = 8
GROW_BELOW_FRACTION = 0.8  # grow only while memory is under 80% of the limit
SLOWER_BY = 1.03  # a grown limit whose batches cost 3% more per token than before goes back
GIB = 1024**3


MEMORY_PROBE_EVERY_S = 0.1  # the batch sizer reads RSS at most this often (a /proc read)
_probe_state: dict[str, object] = {}


def process_rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def recent_rss_bytes() -> int:
    """This process's RSS, read at most every ``MEMORY_PROBE_EVERY_S`` (the batch sizer asks after
    every batch: thousands a second on a fast device, each a /proc read otherwise)."""
    now = time.monotonic()
    state = _probe_state
    if state.get("pid") != os.getpid():  # a forked child measures itself
        state.clear()
        state.update(pid=os.getpid(), process=psutil.Process(), at=-math.inf, rss=0)
    if now - state["at"] >= MEMORY_PROBE_EVERY_S:  # type: ignore[operator]
        state["rss"] = int(state["process"].memory_info().rss)  # type: ignore[attr-defined]
        state["at"] = now
    return state["rss"]  # type: ignore[return-value]


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
        memory_probe: Callable[[], int] = recent_rss_bytes,
        memory_because: str = "",
    ) -> None:
        self.maximum = max(1, maximum) if adaptive else max(1, initial)
        self.limit = max(1, min(initial, self.maximum))
        self.adaptive = adaptive
        self.memory_limit_bytes = memory_limit_bytes
        self._probe = memory_probe
        self._full_streak = 0
        self._failed_at: int | None = None  # the smallest batch that ran out of memory
        self._slower_at: int | None = None  # never grow to this: bigger batches measured slower
        self._streak_cost = 0.0  # seconds per padded token, summed over the current full streak
        self._grown_from: tuple[int, float] | None = None  # (previous limit, its seconds per token)
        log.info(
            "Memory limit set to %.2f GiB for batches%s; batch size %d (%s, max %d)",
            memory_limit_bytes / GIB,
            f" ({memory_because})" if memory_because else "",
            self.limit,
            "adaptive" if adaptive else "fixed",
            self.maximum,
        )

    def after_batch(self, items: int, seconds_per_token: float = 0.0) -> None:
        """Called after every successful batch with its size and its time per padded token.

        A grown limit has to prove itself: once ``GROW_AFTER_FULL_BATCHES`` full batches ran at
        it, their time per padded token is compared with the limit it grew from; if bigger
        batches are slower per token (a CPU whose caches they overflow), the limit goes back and
        never grows to that size again."""
        if not self.adaptive:
            return
        used = self._probe()
        if used > self.memory_limit_bytes:
            self._set(
                max(1, self.limit // 2),
                f"memory {used / GIB:.2f} GiB is over the limit of {self.memory_limit_bytes / GIB:.2f} GiB",
            )
            return
        if items >= self.limit:
            self._full_streak += 1
            self._streak_cost += seconds_per_token
        else:
            self._full_streak, self._streak_cost = 0, 0.0
        if self._full_streak < GROW_AFTER_FULL_BATCHES:
            return
        cost = self._streak_cost / self._full_streak
        if self._grown_from is not None:
            previous, previous_cost = self._grown_from
            self._grown_from = None
            if cost > SLOWER_BY * previous_cost > 0:
                self._slower_at = previous + 1  # bigger is slower here: stay at the previous limit
                self._set(
                    previous,
                    f"batches of {self.limit} took {cost / previous_cost - 1:.0%} more time per token "
                    f"than batches of {previous}",
                )
                return
        ceilings = [self.maximum]
        ceilings += [limit - 1 for limit in (self._failed_at, self._slower_at) if limit is not None]
        ceiling = min(ceilings)
        if self.limit < ceiling and used < GROW_BELOW_FRACTION * self.memory_limit_bytes:
            self._grown_from = (self.limit, cost)
            self._set(
                min(ceiling, self.limit + max(1, self.limit // 2)),
                f"{GROW_AFTER_FULL_BATCHES} full batches in a row with memory at {used / GIB:.2f} GiB",
            )

    def after_out_of_memory(self, items: int, error: BaseException) -> bool:
        """A batch of ``items`` ran out of memory; True if a smaller retry makes sense."""
        if not self.adaptive or items <= 1:
            return False
        self._failed_at = min(items, self._failed_at or items)  # never grow back to it
        self._set(max(1, min(self.limit, items) // 2), f"out of memory on a batch of {items}: {error!r}")
        return True

    def _set(self, new_limit: int, reason: str) -> None:
        self._full_streak, self._streak_cost = 0, 0.0
        if new_limit < self.limit:
            self._grown_from = None  # shrunk for memory: no growth is being judged
        if new_limit != self.limit:
            level = logging.WARNING if new_limit < self.limit else logging.INFO  # shrinking is trouble
            log.log(level, "batch size %d -> %d: %s", self.limit, new_limit, reason)
            self.limit = new_limit
