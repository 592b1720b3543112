"""Choosing the next model batch from the items waiting in the queue.

Two goals pull against each other: pad little (items of similar token length in
one batch, which is where CPU throughput comes from) and keep batches full (which
is where GPU throughput comes from), and all of it fairly (no request waits behind
another's thousands of items, no item waits forever).

The rule, per batch:

1. **Anchor** - one waiting request, chosen round-robin over the waiting
   requests in arrival order. Its shortest item is in the batch, so
   every request makes progress within ``len(waiting)`` batches: a one-text
   request behind a 5,000-text request rides in one of the next two batches,
   and nothing starves.
2. **Fill by length** - the waiting items near the anchor item, of every request, are
   ordered by token length. Every run of consecutive items holding the anchor item is a
   candidate batch; each is priced as itself plus the cheapest way to batch the items
   below it and above it (two dynamic programmes over the cut points, a batch costing
   a fixed overhead plus its padded size). The cheapest candidate runs; among equally
   cheap ones, the largest. So equal-length items always run in full batches (the
   leftover batch is never the anchor's), and a batch stops growing only where the
   padding it would add costs more than another batch would.
3. **Budget** - at most ``max_items`` items, and padded cost (longest item x
   items) within ``max_tokens``. An item longer than the budget rides alone
   (it is never refused for being long).

The fixed overhead and the per-token cost come from ``BatchCostModel``, fitted on
timed batches. Until it has measurements the overhead is unbounded: a request is
never split to save padding unless splitting was measured to be cheaper. On a device
measured flat (a GPU: padding costs next to nothing) length grouping buys nothing and
spreads every request over many batches, so none finishes early and a closed loop of
clients drains the queue into half batches: there the batch is the anchor's items, then
whole requests in arrival order (``plan_flat_batch``), in time proportional to the number
of requests waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

UNMEASURED_OVERHEAD_TOKENS = 1e9  # no timings yet: only the budget splits a batch
REACH_BATCHES = 1  # items considered on each side of the anchor, in batches
PURE_PYTHON_MAX_ITEMS = 64  # batch limits up to this plan in plain floats (faster than NumPy calls)


class Waiting(Protocol):
    """A queued request as the planner sees it."""

    lengths: np.ndarray  # token length of each item
    remaining: np.ndarray  # indices of undispatched items, ordered by length (shortest first)


@dataclass(frozen=True, slots=True)
class Pick:
    request_position: int  # index into the ``waiting`` sequence
    item_indices: np.ndarray  # indices into that request's items


@dataclass(frozen=True, slots=True)
class BatchCost:
    """A batch of ``n`` items padded to ``L`` tokens costs ``overhead + n * L * (1 + quadratic * L)``
    token-equivalents (the last term is attention's cost growing with the square of the length)."""

    overhead: float = UNMEASURED_OVERHEAD_TOKENS
    quadratic: float = 0.0
    # Measured flat (a GPU): padding was timed and costs next to nothing, so requests are kept
    # whole in arrival order (plan_flat_batch) rather than grouped by length. Unmeasured: False.
    flat: bool = field(default=False, compare=False)

    def per_item(self, lengths: np.ndarray) -> np.ndarray:
        return lengths * (1.0 + self.quadratic * lengths)


def plan_batch(
    waiting: Sequence[Waiting],
    anchor: int,
    max_items: int,
    max_tokens: int | None = None,
    cost: BatchCost | None = None,
) -> list[Pick]:
    """Choose the next batch; ``anchor`` indexes ``waiting`` (which must be non-empty)."""
    cost = cost or BatchCost()
    everything = _everything_if_cheapest(waiting, max_items, max_tokens, cost)
    if everything is not None:
        if cost.flat:  # as plan_flat_batch orders them: the anchor's items first
            everything.sort(key=lambda pick: pick.request_position != anchor)
        return everything
    if cost.flat:
        return plan_flat_batch(waiting, anchor, max_items, max_tokens)
    return _search_batch(waiting, anchor, max_items, max_tokens, cost)


def _search_batch(
    waiting: Sequence[Waiting], anchor: int, max_items: int, max_tokens: int | None, cost: BatchCost
) -> list[Pick]:
    """Steps 1-3 of the module's rule: the cheapest batch holding the anchor's shortest item."""
    reach = REACH_BATCHES * max_items
    anchor_length = int(waiting[anchor].lengths[waiting[anchor].remaining[0]])
    # Only items that can be within ``reach`` ranks of the anchor item in the merged order: those
    # within ``reach`` of where the anchor's length falls in their own request (the anchor's own
    # request: from its first item). A request longer than any window is cut to its window here,
    # one search each; the rest are windowed all at once (a NumPy call per step, not several per
    # request: a queue of many small requests is the common case under load).
    span = 2 * reach + 1
    items_parts, lengths_parts = [], []
    cut_below = cut_above = False  # items of a long request left outside its window
    for pos, request in enumerate(waiting):
        remaining, lengths = request.remaining, request.lengths[request.remaining]
        if len(remaining) > span:
            middle = 0 if pos == anchor else int(np.searchsorted(lengths, anchor_length, side="left"))
            low, high = max(0, middle - reach), middle + reach + 1
            cut_below |= low > 0
            cut_above |= high < len(remaining)
            remaining, lengths = remaining[low:high], lengths[low:high]
        items_parts.append(remaining)
        lengths_parts.append(lengths)
    counts = np.fromiter((len(part) for part in items_parts), dtype=np.int64, count=len(waiting))
    starts = np.cumsum(counts) - counts
    all_items, all_lengths = np.concatenate(items_parts), np.concatenate(lengths_parts)
    all_owners = np.repeat(np.arange(len(waiting)), counts)
    shorter = np.bincount(all_owners, weights=all_lengths < anchor_length, minlength=len(waiting))
    middle = shorter.astype(np.int64)  # each request's items shorter than the anchor item
    middle[anchor] = 0
    rank = np.arange(len(all_items)) - starts[all_owners]
    near = middle[all_owners]
    keep = (rank >= near - reach) & (rank <= near + reach)
    left_below = cut_below or bool(np.any(middle - reach > 0))  # items outside the window
    left_above = cut_above or bool(np.any(middle + reach + 1 < counts))
    owners, items, lengths = all_owners[keep], all_items[keep], all_lengths[keep]
    # The merged order: by length, ties by arrival, then each request's own order. Only the
    # ``reach`` items either side of the anchor item are needed, so they are selected (a
    # partition of every candidate) and only they are sorted: a deep queue has thousands.
    places = rank[keep]
    key = (lengths.astype(np.int64) * len(waiting) + owners) * (int(places.max()) + 1) + places
    position = int(np.count_nonzero(key < key[np.flatnonzero(owners == anchor)[0]]))
    low = max(0, position - reach)
    high = min(len(key), position + reach + 1)
    if high - low < len(key):
        bounds = np.partition(key, [low, high - 1])
        window = np.flatnonzero((key >= bounds[low]) & (key <= bounds[high - 1]))
    else:
        window = np.arange(len(key))
    window = window[np.argsort(key[window])]
    more_below, more_above = low > 0 or left_below, high < len(key) or left_above
    start, stop = anchor_batch(
        lengths[window], position - low, max_items, max_tokens, cost, more_below, more_above
    )
    chosen = window[start:stop]

    picks = []
    for pos in np.unique(owners[chosen]):
        mine = chosen[owners[chosen] == pos]
        picks.append(Pick(int(pos), items[mine]))
    return picks


def _everything_if_cheapest(
    waiting: Sequence[Waiting], max_items: int, max_tokens: int | None, cost: BatchCost
) -> list[Pick] | None:
    """Every waiting item as one batch, when that is what the search below would choose, found
    without searching (the common case of a lightly loaded server: one small request waits).
    All items fit one batch within the budget, and one batch is a cheapest plan: it costs
    ``overhead + n * price(longest)``, and any split costs at least ``2 * overhead`` plus each
    item's own price, so when the padding one batch adds is within one overhead, no split is
    cheaper (and among equally cheap plans the search takes the largest batch). Picks as the
    search returns them: requests in queue order, each one's items shortest first. None: search."""
    total = 0
    longest = 0
    for request in waiting:
        total += len(request.remaining)
        if total > max_items:
            return None
        if len(request.remaining):
            longest = max(longest, int(request.lengths[request.remaining[-1]]))
    if total == 0 or (max_tokens is not None and total > 1 and total * longest > max_tokens):
        return None
    if cost.overhead < UNMEASURED_OVERHEAD_TOKENS:
        lengths = np.concatenate([request.lengths[request.remaining] for request in waiting])
        padding = float(total * cost.per_item(np.array([longest]))[0] - cost.per_item(lengths).sum())
        if padding > cost.overhead:
            return None
    return [Pick(pos, request.remaining) for pos, request in enumerate(waiting) if len(request.remaining)]


def plan_flat_batch(
    waiting: Sequence[Waiting], anchor: int, max_items: int, max_tokens: int | None = None
) -> list[Pick]:
    """The batch for a flat device (padding free, every batch the same price, so any full batch is
    a cheapest one): the anchor's items, then whole requests in arrival order, each shortest
    first, up to ``max_items`` and the padded-token budget. Keeping requests whole means they
    finish (and their clients send the next) as early as possible, so the queue never drains
    into a half batch, as it does when every request is spread over batches by length. Work
    proportional to the requests waiting, not to their items."""
    picks: list[Pick] = []
    taken = longest = 0
    for pos in [anchor, *(p for p in range(len(waiting)) if p != anchor)]:
        request = waiting[pos]
        room = min(max_items - taken, len(request.remaining))
        if room <= 0:
            break
        chosen = request.remaining[:room]
        if max_tokens is not None:  # lengths ascend: the longest prefix within the budget
            lengths = request.lengths[chosen]
            padded = np.maximum(np.maximum.accumulate(lengths), longest) * np.arange(
                taken + 1, taken + room + 1
            )
            fits = int(np.searchsorted(padded > max_tokens, True))  # padded ascends too
            chosen = chosen[: max(fits, 0 if taken else 1)]
        if len(chosen):
            picks.append(Pick(pos, chosen))
            taken += len(chosen)
            longest = max(longest, int(request.lengths[chosen[-1]]))
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


def anchor_batch(
    sorted_lengths: np.ndarray,
    position: int,
    max_items: int,
    max_tokens: int | None,
    cost: BatchCost,
    more_below: bool = False,
    more_above: bool = False,
) -> tuple[int, int]:
    """The batch ``[start, stop)`` of consecutive items (in length order) holding ``position``
    that is part of the cheapest way to batch them all; the largest such batch on a tie.

    ``more_below``/``more_above``: these items are a window of a longer queue, so a batch at
    that edge would be filled from beyond it: it pays its share of the overhead only.
    """
    lengths = sorted_lengths.astype(np.float64)
    n = len(lengths)
    per_item = cost.per_item(lengths)
    limit = _size_limits(lengths, max_items, max_tokens)
    small = max_items <= PURE_PYTHON_MAX_ITEMS  # the same sums, in plain floats: no NumPy call per item
    prefixes = _cheapest_prefixes_small if small else _cheapest_prefixes
    suffixes = _cheapest_suffixes_small if small else _cheapest_suffixes
    below = prefixes(per_item[: position + 1], limit[: position + 1], cost.overhead, more_below)
    above = suffixes(lengths[position:], per_item[position:], max_items, max_tokens, cost, more_above)
    # Candidate (start k, stop j) with k <= position < j: a batch ending at j may hold limit[j-1] items.
    starts = np.arange(max(0, position - max_items + 1), position + 1)
    stops = np.arange(position + 1, min(n, position + max_items) + 1)
    size = stops[None, :] - starts[:, None]
    allowed = size <= limit[stops - 1][None, :]
    total = (
        below[starts][:, None]
        + cost.overhead
        + size * per_item[stops - 1][None, :]
        + above[stops - position][None, :]
    )
    total = np.where(allowed, total, np.inf)
    best = total.min()
    ties = np.flatnonzero((total <= best + 1e-9 * max(1.0, abs(best))).ravel())
    k, j = np.unravel_index(ties[np.argmax(size.ravel()[ties])], total.shape)
    return int(starts[k]), int(stops[j])


def _size_limits(lengths: np.ndarray, max_items: int, max_tokens: int | None) -> np.ndarray:
    """The most items a batch whose longest item is ``lengths[i]`` may hold (at least one)."""
    limit = np.full(len(lengths), max_items, dtype=np.int64)
    if max_tokens is not None:
        limit = np.minimum(limit, np.maximum(1, max_tokens // np.maximum(lengths, 1)).astype(np.int64))
    return limit


def _cheapest_prefixes(
    per_item: np.ndarray, limit: np.ndarray, overhead: float, open_start: bool
) -> np.ndarray:
    """``best[i]``: the least cost of batching the first ``i`` of these items (``i`` up to
    ``len - 1``: the last item is the anchor, batched by the caller)."""
    n = len(per_item) - 1
    best = np.zeros(n + 1)
    descending = np.arange(int(limit.max(initial=1)), 0, -1, dtype=np.float64)
    for j in range(1, n + 1):
        first = max(0, j - int(limit[j - 1]))
        sizes = descending[-(j - first) :]
        candidate = best[first:j] + sizes * per_item[j - 1] + overhead
        if open_start and first == 0:  # the batch from the window's edge is shared with items below
            candidate[0] -= overhead * (1.0 - sizes[0] / limit[j - 1])
        best[j] = candidate.min()
    return best


def _cheapest_suffixes(
    lengths: np.ndarray,
    per_item: np.ndarray,
    max_items: int,
    max_tokens: int | None,
    cost: BatchCost,
    open_end: bool,
) -> np.ndarray:
    """``best[i]``: the least cost of batching these items from ``i`` to the end (``i`` from 1:
    item 0 is the anchor); a batch's price is set by its last (longest) item."""
    n = len(lengths)
    best = np.zeros(n + 1)
    for i in range(n - 1, 0, -1):
        stop = min(n, i + max_items)
        stops = np.arange(i + 1, stop + 1)
        sizes = stops - i
        padded = sizes * lengths[stops - 1]
        candidate = best[stops] + cost.overhead + sizes * per_item[stops - 1]
        if open_end and stop == n:  # the batch to the window's edge is shared with items above
            candidate[-1] -= cost.overhead * (1.0 - sizes[-1] / max_items)
        if max_tokens is not None:
            candidate = np.where((padded > max_tokens) & (sizes > 1), np.inf, candidate)
        best[i] = candidate.min()
    return best


def _cheapest_prefixes_small(
    per_item: np.ndarray, limit: np.ndarray, overhead: float, open_start: bool
) -> np.ndarray:
    """``_cheapest_prefixes`` for small batches: the same operations in the same order on Python
    floats (bit for bit the same result), without a NumPy call per item."""
    n = len(per_item) - 1
    prices, limits = per_item.tolist(), limit.tolist()
    best = [0.0] * (n + 1)
    for j in range(1, n + 1):
        first = max(0, j - limits[j - 1])
        price = prices[j - 1]
        candidates = [best[k] + (j - k) * price + overhead for k in range(first, j)]
        if open_start and first == 0:
            candidates[0] -= overhead * (1.0 - float(j) / limits[j - 1])
        best[j] = min(candidates)
    return np.array(best)


def _cheapest_suffixes_small(
    lengths: np.ndarray,
    per_item: np.ndarray,
    max_items: int,
    max_tokens: int | None,
    cost: BatchCost,
    open_end: bool,
) -> np.ndarray:
    """``_cheapest_suffixes`` for small batches, as ``_cheapest_prefixes_small``. A batch over the
    token budget is left out rather than priced infinite: lengths ascend, so the batches from
    ``i`` over the budget are the longest ones, a tail of the candidates."""
    n = len(lengths)
    sizes_of, prices = lengths.tolist(), per_item.tolist()
    overhead = cost.overhead
    best = [0.0] * (n + 1)
    for i in range(n - 1, 0, -1):
        stop = min(n, i + max_items)
        candidates = [best[end] + overhead + (end - i) * prices[end - 1] for end in range(i + 1, stop + 1)]
        if open_end and stop == n:
            candidates[-1] -= overhead * (1.0 - (n - i) / max_items)
        if max_tokens is not None:
            size = len(candidates)
            while size > 1 and size * sizes_of[i + size - 1] > max_tokens:
                size -= 1
            del candidates[size:]
        best[i] = min(candidates)
    return np.array(best)


class BatchCostModel:
    """Fits a batch's cost from timed batches: ``seconds = a + b * padded + c * padded * length``.

    ``a / b`` is the fixed cost of a batch in padded tokens (how many padded tokens a batch may
    waste before splitting it in two costs more), ``c / b`` the weight of attention's quadratic
    term. On a CPU the overhead is small (small, well-packed batches win); on a GPU the time
    barely depends on the tokens, the fitted per-token cost is about zero, and the overhead is
    unbounded (full batches win). Calibration batches of chosen shapes run at start-up, so
    the fit does not rest only on batches it chose itself.
    """

    def __init__(self, window: int = 256, min_batches: int = 8, refit_every: int = 16) -> None:
        self._window = window
        self._min_batches = min_batches
        self._refit_every = refit_every
        self._rows = np.zeros((window, 3))  # (padded, padded x longest, seconds), a ring
        self._count = 0  # rows observed in all (the ring holds the last ``window``)
        self._fitted: BatchCost | None = None
        self._fitted_rows = 0  # rows the last fit saw
        self._new_rows = 0  # rows observed since the last fit

    def observe(self, items: int, longest: int, seconds: float) -> None:
        padded = float(items * longest)
        self._rows[self._count % self._window] = (padded, padded * longest, seconds)
        self._count += 1
        self._new_rows += 1

    def cost(self) -> BatchCost:
        """The fitted cost; refitted (a least-squares fit over up to ``window`` batches) as soon as
        there are enough batches to fit at all, then once a quarter of the rows it holds (at least
        ``refit_every``) is new: the planner asks before every batch, and a few batches barely
        move a fit over hundreds."""
        rows = self._held
        first = self._fitted_rows < self._min_batches <= rows
        due = self._new_rows >= max(self._refit_every, rows // 4)
        if self._fitted is None or first or due:
            self._fitted = self._fit()
            self._fitted_rows, self._new_rows = rows, 0
        return self._fitted

    @property
    def _held(self) -> int:
        """Rows in the ring: every one observed, up to ``window``."""
        return min(self._count, self._window)

    def _fit(self) -> BatchCost:
        if self._held < self._min_batches:
            return BatchCost()
        rows = self._rows[: self._held]
        padded, quadratic, seconds = rows[:, 0], rows[:, 1], rows[:, 2]
        scale = max(float(padded.max()), 1.0)
        if float(padded.max() - padded.min()) <= 1e-9 * scale:
            return BatchCost()  # every batch had the same size: nothing to learn from
        design = np.column_stack([np.ones_like(padded), padded, quadratic])
        (a, b, c), *_ = np.linalg.lstsq(design, seconds, rcond=None)
        if c < 0 or not np.isfinite(c):  # no measurable quadratic term: fit the line alone
            (a, b), *_ = np.linalg.lstsq(design[:, :2], seconds, rcond=None)
            c = 0.0
        typical = float(np.median(seconds))
        if b <= 0 or b * float(np.median(padded)) < 0.01 * typical:
            return BatchCost(UNMEASURED_OVERHEAD_TOKENS, 0.0, flat=True)  # tokens cost next to nothing
        overhead = min(max(a / b, 1.0), UNMEASURED_OVERHEAD_TOKENS)
        return BatchCost(float(overhead), float(c / b))
