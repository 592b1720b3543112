"""Choosing the next model batch from the items waiting in the queue.

Two goals pull against each other: pad little (items of similar token length in
one batch, which is where CPU throughput comes from) and be fair (no request
waits behind another's thousands of items, no item waits forever).

The rule, per batch:

1. **Anchor** - one waiting request, chosen round-robin over the waiting
   requests in arrival order. Its shortest item is in the batch, so
   every request makes progress within ``len(waiting)`` batches: a one-text
   request behind a 5,000-text request rides in one of the next two batches,
   and nothing starves.
2. **Fill by length** - all waiting items, of every request, are ordered by
   token length; the batch is the run of consecutive items in that order which
   the waiting items near the anchor's shortest item are cut into the cheapest
   set of batches (a batch costing a fixed overhead plus its padded size;
   ``BatchCostModel`` learns the overhead from timings), and the batch holding
   the anchor item runs. Items of similar length share a batch, whichever
   request they came from, and a batch stops growing where the padding it
   would add costs more than another batch.
3. **Budget** - at most ``max_items`` items, and padded cost (longest item x
   items) within ``max_tokens``. An item longer than the budget rides alone
   (it is never refused for being long).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_OVERHEAD_TOKENS = 64.0  # until timings say otherwise: about 5 ms of a small model on a CPU


class Waiting(Protocol):
    """A queued request as the planner sees it."""

    lengths: np.ndarray  # token length of each item
    remaining: np.ndarray  # indices of undispatched items, ordered by length (shortest first)


@dataclass(frozen=True, slots=True)
class Pick:
    request_position: int  # index into the ``waiting`` sequence
    item_indices: np.ndarray  # indices into that request's items


def plan_batch(
    waiting: Sequence[Waiting],
    anchor: int,
    max_items: int,
    max_tokens: int | None = None,
    overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS,
) -> list[Pick]:
    """Choose the next batch; ``anchor`` indexes ``waiting`` (which must be non-empty)."""
    owners = np.concatenate([np.full(len(w.remaining), pos) for pos, w in enumerate(waiting)])
    items = np.concatenate([w.remaining for w in waiting])
    lengths = np.concatenate([w.lengths[w.remaining] for w in waiting])
    order = np.lexsort((owners, lengths))  # by length, ties by arrival
    sorted_lengths = lengths[order]
    position = int(np.flatnonzero(owners[order] == anchor)[0])  # the anchor's shortest item
    start, stop = _cheapest_segment(sorted_lengths, position, max_items, max_tokens, overhead_tokens)
    chosen = order[start:stop]

    picks = []
    for pos in np.unique(owners[chosen]):
        mine = chosen[owners[chosen] == pos]
        picks.append(Pick(int(pos), items[mine]))
    return picks


def plan_batch_in_arrival_order(
    waiting: Sequence[Waiting], max_items: int, max_tokens: int | None = None
) -> list[Pick]:
    """The batch a server without length grouping would run (BATCH_LENGTH_GROUPING=false).

    Items in arrival order (requests first come, first served; each request's items in
    its own order) until ``max_items`` or the padded-token budget; at least one item.
    Kept for comparison and diagnosis: it pads as much as the traffic is mixed.
    """
    picks: list[Pick] = []
    taken = 0
    longest = 0
    for pos, request in enumerate(waiting):
        chosen = []
        for index in np.sort(request.remaining):
            length = int(request.lengths[index])
            padded = max(longest, length) * (taken + 1)
            if taken and (taken >= max_items or (max_tokens is not None and padded > max_tokens)):
                break
            chosen.append(index)
            taken, longest = taken + 1, max(longest, length)
        if chosen:
            picks.append(Pick(pos, np.array(chosen, dtype=np.int64)))
        if len(chosen) < len(request.remaining):
            break
    return picks


def _cheapest_segment(
    sorted_lengths: np.ndarray,
    position: int,
    max_items: int,
    max_tokens: int | None,
    overhead_tokens: float,
) -> tuple[int, int]:
    """Cut the items near ``position`` (in length order) into the cheapest set of batches
    and return the one holding ``position``.

    A batch of consecutive items ``k..j-1`` costs ``overhead + (j - k) x length[j-1]``; a
    dynamic programme over the cut points finds the partition of least total cost.
    Only a neighbourhood of the anchor is cut, so a queue of thousands stays cheap to plan.
    """
    reach = 4 * max_items
    low = max(0, position - reach)
    high = min(len(sorted_lengths), position + reach + 1)
    window = sorted_lengths[low:high].astype(np.float64)
    n = len(window)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        starts = np.arange(max(0, j - max_items), j)
        sizes = j - starts
        padded = sizes * window[j - 1]
        cost = best[starts] + overhead_tokens + padded
        if max_tokens is not None:
            cost[(padded > max_tokens) & (sizes > 1)] = np.inf
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], starts[k]
    j = n
    while cut[j] > position - low:
        j = int(cut[j])
    return low + int(cut[j]), low + j


class BatchCostModel:
    """Estimates a batch's fixed cost in token-equivalents from observed batch timings.

    A batch costs about ``a + b x padded_tokens`` seconds; ``a / b`` says how many padded
    tokens a batch may waste before splitting it in two costs more than the waste. It is
    small on a CPU (small, well-packed batches win) and large on a GPU (big batches win).
    """

    def __init__(self, decay: float = 0.98, min_batches: int = 16) -> None:
        self._decay = decay
        self._min_batches = min_batches
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        self._seen = 0

    def observe(self, padded_tokens: int, seconds: float) -> None:
        d = self._decay
        self._n = self._n * d + 1.0
        self._x = self._x * d + padded_tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + padded_tokens * padded_tokens
        self._xy = self._xy * d + padded_tokens * seconds
        self._seen += 1

    def overhead_tokens(self) -> float:
        if self._seen < self._min_batches:
            return DEFAULT_OVERHEAD_TOKENS
        spread = self._n * self._xx - self._x * self._x
        if spread <= 1e-9:
            return DEFAULT_OVERHEAD_TOKENS
        slope = (self._n * self._xy - self._x * self._y) / spread
        intercept = (self._y - slope * self._x) / self._n
        if slope <= 0:
            return DEFAULT_OVERHEAD_TOKENS
        return float(min(max(intercept / slope, 8.0), 1_000_000.0))
