"""The batch planner: budget, length grouping, full batches and fairness, on plain numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from reranker.engine.batching import BatchCost, BatchCostModel, plan_batch, plan_batch_in_arrival_order

CPU = BatchCost(overhead=64.0)  # a CPU: a batch costs about 64 padded tokens' worth of time
FLAT = BatchCost()  # a GPU, or no timings yet: padding costs next to nothing next to a batch


@dataclass
class Waiting:
    lengths: np.ndarray
    remaining: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = np.argsort(self.lengths, kind="stable")


def waiting(*lengths: list[int]) -> list[Waiting]:
    return [Waiting(np.array(ls)) for ls in lengths]


def chosen_lengths(queue: list[Waiting], picks) -> list[int]:
    return sorted(int(queue[p.request_position].lengths[i]) for p in picks for i in p.item_indices)


def test_items_of_similar_length_share_a_batch_across_requests() -> None:
    queue = waiting([5, 300, 6, 290], [300, 7, 310, 4])
    picks = plan_batch(queue, anchor=0, max_items=4)
    assert chosen_lengths(queue, picks) == [4, 5, 6, 7]
    assert {p.request_position for p in picks} == {0, 1}
    short_only = waiting([5, 6], [7, 4, 300])
    assert chosen_lengths(short_only, plan_batch(short_only, anchor=0, max_items=4)) == [4, 5, 6, 7]


def test_a_batch_stops_growing_where_padding_costs_more_than_a_new_batch() -> None:
    queue = waiting([10] * 8 + [200])
    picks = plan_batch(queue, anchor=0, max_items=32, cost=CPU)
    assert chosen_lengths(queue, picks) == [10] * 8
    many = waiting([10] * 8 + [12])
    assert len(chosen_lengths(many, plan_batch(many, anchor=0, max_items=32, cost=CPU))) == 9


def test_anchor_item_is_always_included() -> None:
    queue = waiting([5] * 10, [400, 410])
    picks = plan_batch(queue, anchor=1, max_items=4)
    assert 400 in chosen_lengths(queue, picks)


def test_padded_token_budget_is_respected() -> None:
    queue = waiting([10, 20, 30, 40, 50], [45, 48])
    picks = plan_batch(queue, anchor=0, max_items=32, max_tokens=100)
    lengths = chosen_lengths(queue, picks)
    assert max(lengths) * len(lengths) <= 100
    assert 10 in lengths


def test_cost_model_learns_the_fixed_cost_of_a_batch() -> None:
    model = BatchCostModel()
    assert model.cost() == FLAT  # no timings: never split a batch to save padding
    for items in (1, 4, 8, 16, 32):
        for longest in (16, 64, 128):
            model.observe(items, longest, 0.005 + 0.0001 * items * longest)  # 5 ms + 0.1 ms per token
    assert model.cost().overhead == pytest.approx(50, rel=0.01)
    assert model.cost().quadratic == pytest.approx(0, abs=1e-6)


def test_cost_model_learns_attention_s_quadratic_term() -> None:
    model = BatchCostModel()
    for items in (1, 4, 8, 16, 32):
        for longest in (16, 64, 128, 256, 512):
            padded = items * longest
            model.observe(items, longest, 0.002 + 1e-5 * padded + 2e-8 * padded * longest)
    assert model.cost().overhead == pytest.approx(200, rel=0.01)
    assert model.cost().quadratic == pytest.approx(2e-3, rel=0.01)


def test_cost_model_on_a_flat_device_never_splits_for_padding() -> None:
    """A GPU: the time of a batch barely depends on its tokens (and jitters)."""
    model = BatchCostModel()
    rng = np.random.default_rng(3)
    for items in (1, 4, 8, 16, 32):
        for longest in (16, 64, 128, 256):
            model.observe(items, longest, 0.005 + rng.normal(0, 2e-5))
    assert model.cost() == FLAT


def test_an_item_longer_than_the_budget_rides_alone() -> None:
    queue = waiting([500], [5, 6])
    picks = plan_batch(queue, anchor=0, max_items=8, max_tokens=100)
    assert chosen_lengths(queue, picks) == [500]


def test_arrival_order_planner_takes_items_as_they_came_within_the_budget() -> None:
    queue = waiting([5, 300, 7], [6, 8])
    picks = plan_batch_in_arrival_order(queue, max_items=4)
    assert [(p.request_position, list(p.item_indices)) for p in picks] == [(0, [0, 1, 2]), (1, [0])]
    budget = plan_batch_in_arrival_order(queue, max_items=4, max_tokens=600)
    assert [(p.request_position, list(p.item_indices)) for p in budget] == [(0, [0, 1])]
    long_one = waiting([900, 10])
    assert chosen_lengths(long_one, plan_batch_in_arrival_order(long_one, 4, max_tokens=100)) == [900]


def drain(queue: list[Waiting], max_items: int, cost: BatchCost, max_tokens: int | None = None):
    """Plan batches until nothing waits (anchors round-robin, as the controller does)."""
    batches: list[list[int]] = []
    turn = 0
    while True:
        live = [w for w in queue if len(w.remaining)]
        if not live:
            return batches
        picks = plan_batch(live, turn % len(live), max_items, max_tokens, cost)
        turn += 1
        batch = []
        for pick in picks:
            request = live[pick.request_position]
            batch.extend(int(request.lengths[i]) for i in pick.item_indices)
            request.remaining = request.remaining[~np.isin(request.remaining, pick.item_indices)]
        batches.append(batch)


@pytest.mark.parametrize("cost", [CPU, FLAT], ids=["cpu", "flat"])
def test_equal_length_items_run_in_full_batches(cost: BatchCost) -> None:
    """Ingestion chunks and documents cut at the window: 1,000 items of one length."""
    batches = drain(waiting([40] * 1000), max_items=32, cost=cost)
    assert len(batches) == 32  # ceil(1000 / 32): 31 full batches and the rest
    assert sorted(len(b) for b in batches)[1:] == [32] * 31
    assert sum(len(b) for b in batches) == 1000


@pytest.mark.parametrize("cost", [CPU, FLAT], ids=["cpu", "flat"])
def test_many_requests_of_equal_lengths_fill_every_batch(cost: BatchCost) -> None:
    queue = waiting(*([128] * 1000 for _ in range(16)))
    batches = drain(queue, max_items=64, cost=cost)
    assert sum(len(b) for b in batches) == 16_000
    assert len(batches) <= 16_000 // 64 + 16  # at most one partial batch per request
    assert np.mean([len(b) for b in batches]) >= 0.9 * 64


def test_bimodal_lengths_never_share_a_batch_and_fill_them() -> None:
    rng = np.random.default_rng(11)
    lengths = rng.permutation([12] * 500 + [300] * 500)
    batches = drain(waiting(list(lengths)), max_items=32, cost=CPU)
    assert all(len(set(b)) == 1 for b in batches)  # short and long items apart
    assert len(batches) <= 2 * 16  # 500 of each: 16 batches each at most
    assert sum(len(b) for b in batches) == 1000


def test_long_tail_lengths_pad_less_than_arrival_order_and_fill_batches_on_a_flat_device() -> None:
    rng = np.random.default_rng(5)
    lengths = list(np.clip(rng.lognormal(4.0, 0.8, size=3000).astype(int), 4, 512))

    def padded(batches: list[list[int]]) -> int:
        return sum(max(b) * len(b) for b in batches)

    cpu = drain(waiting(lengths), max_items=32, cost=CPU)
    arrival = [lengths[i : i + 32] for i in range(0, len(lengths), 32)]
    cpu_cost = padded(cpu) + CPU.overhead * len(cpu)
    assert cpu_cost < 0.6 * (padded(arrival) + CPU.overhead * len(arrival))
    flat = drain(waiting(lengths), max_items=32, cost=FLAT)
    assert len(flat) == -(-3000 // 32)  # the fewest batches possible
    assert padded(flat) < 0.6 * padded(arrival)  # and still grouped by length


def test_a_lone_request_is_not_split_without_measurements() -> None:
    rng = np.random.default_rng(2)
    request = list(rng.integers(60, 170, size=50))  # 50 RAG passages of 40-120 words
    assert len(drain(waiting(request), max_items=64, cost=FLAT)) == 1
    assert len(drain(waiting(request), max_items=32, cost=FLAT)) == 2


def test_the_plain_float_programmes_equal_the_numpy_ones_bit_for_bit() -> None:
    """Small batch limits plan with plain Python floats (no NumPy call per item): the same
    operations in the same order, so the same plans."""
    from reranker.engine import batching

    rng = np.random.default_rng(0)
    for _ in range(500):
        n, max_items = int(rng.integers(1, 140)), int(rng.integers(1, 65))
        lengths = np.sort(rng.integers(1, 400, size=n)).astype(np.float64)
        max_tokens = None if rng.random() < 0.4 else int(rng.integers(50, 5000))
        cost = BatchCost(float(rng.choice([1.0, 37.5, 300.0, 1e9])), float(rng.choice([0.0, 1e-3])))
        per_item, limit = cost.per_item(lengths), batching._size_limits(lengths, max_items, max_tokens)
        position, below, above = int(rng.integers(0, n)), bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        prefixes = (per_item[: position + 1], limit[: position + 1], cost.overhead, below)
        suffixes = (lengths[position:], per_item[position:], max_items, max_tokens, cost, above)
        assert np.array_equal(
            batching._cheapest_prefixes(*prefixes), batching._cheapest_prefixes_small(*prefixes)
        )
        assert np.array_equal(
            batching._cheapest_suffixes(*suffixes), batching._cheapest_suffixes_small(*suffixes)
        )


def test_taking_everything_without_a_search_plans_what_the_search_plans() -> None:
    """The lightly loaded case (all waiting items fit one batch, and it is a cheapest plan) skips
    the search: the picks must be exactly the search's, and the shortcut must fire."""
    from reranker.engine import batching

    rng = np.random.default_rng(3)
    shortcuts = 0
    for _ in range(2000):
        requests = int(rng.integers(1, 4))
        queue = waiting(*(list(rng.integers(1, 300, size=int(rng.integers(1, 12)))) for _ in range(requests)))
        max_items = int(rng.integers(1, 40))
        max_tokens = None if rng.random() < 0.5 else int(rng.integers(50, 6000))
        cost = BatchCost(float(rng.choice([1.0, 37.5, 300.0, 1e9])), float(rng.choice([0.0, 1e-3])))
        anchor = int(rng.integers(0, len(queue)))
        shortcut = batching._everything_if_cheapest(queue, max_items, max_tokens, cost)
        if shortcut is None:
            continue
        shortcuts += 1
        searched = batching._search_batch(queue, anchor, max_items, max_tokens, cost)
        assert [(p.request_position, p.item_indices.tolist()) for p in shortcut] == [
            (p.request_position, p.item_indices.tolist()) for p in searched
        ]
    assert shortcuts > 200


def _search_batch_request_by_request(queue: list[Waiting], anchor: int, max_items: int, max_tokens, cost):  # type: ignore[no-untyped-def]
    """The search as it was first written, each request's window found on its own (a NumPy call
    per step and request): the oracle of the vectorised one."""
    from reranker.engine.batching import REACH_BATCHES, Pick, anchor_batch

    reach = REACH_BATCHES * max_items
    anchor_length = int(queue[anchor].lengths[queue[anchor].remaining[0]])
    owners_parts, items_parts, left_below, left_above = [], [], False, False
    for pos, request in enumerate(queue):
        middle = (
            0 if pos == anchor else int(np.searchsorted(request.lengths[request.remaining], anchor_length))
        )
        chosen = request.remaining[max(0, middle - reach) : middle + reach + 1]
        left_below |= middle - reach > 0
        left_above |= middle + reach + 1 < len(request.remaining)
        owners_parts.append(np.full(len(chosen), pos))
        items_parts.append(chosen)
    owners, items = np.concatenate(owners_parts), np.concatenate(items_parts)
    lengths = np.concatenate([w.lengths[i] for w, i in zip(queue, items_parts, strict=True)])
    order = np.lexsort((owners, lengths))
    position = int(np.flatnonzero(owners[order] == anchor)[0])
    low, high = max(0, position - reach), min(len(order), position + reach + 1)
    start, stop = anchor_batch(
        lengths[order][low:high], position - low, max_items, max_tokens, cost,
        low > 0 or left_below, high < len(order) or left_above,
    )  # fmt: skip
    chosen = order[low + start : low + stop]
    return [Pick(int(pos), items[chosen[owners[chosen] == pos]]) for pos in np.unique(owners[chosen])]


def test_the_search_over_all_requests_at_once_plans_what_a_request_by_request_search_plans() -> None:
    """Many waiting requests (64 clients): the window of each is found for all at once; the picks
    must be exactly those of the search written request by request, windows cut or not."""
    from reranker.engine import batching

    rng = np.random.default_rng(11)
    for _ in range(1500):
        requests = int(rng.integers(1, 40))
        queue = waiting(*(list(rng.integers(1, 300, size=int(rng.integers(1, 60)))) for _ in range(requests)))
        for request in queue[1:]:  # some requests part-dispatched already: fewer items remain
            request.remaining = request.remaining[: int(rng.integers(1, len(request.remaining) + 1))]
        max_items = int(rng.integers(1, 100))  # past 64: the NumPy programmes
        max_tokens = None if rng.random() < 0.5 else int(rng.integers(50, 6000))
        cost = BatchCost(float(rng.choice([1.0, 37.5, 300.0])), float(rng.choice([0.0, 1e-3])))
        anchor = int(rng.integers(0, len(queue)))
        expected = _search_batch_request_by_request(queue, anchor, max_items, max_tokens, cost)
        searched = batching._search_batch(queue, anchor, max_items, max_tokens, cost)
        assert [(p.request_position, p.item_indices.tolist()) for p in searched] == [
            (p.request_position, p.item_indices.tolist()) for p in expected
        ]


def test_on_a_flat_device_everything_that_fits_is_the_flat_plan_found_without_planning() -> None:
    from reranker.engine.batching import plan_flat_batch

    flat = BatchCost(flat=True)
    rng = np.random.default_rng(5)
    for _ in range(500):
        queue = waiting(*(list(rng.integers(1, 300, size=int(rng.integers(1, 9)))) for _ in range(4)))
        max_items = int(rng.integers(1, 40))
        max_tokens = None if rng.random() < 0.5 else int(rng.integers(50, 6000))
        anchor = int(rng.integers(0, len(queue)))
        planned = plan_batch(queue, anchor, max_items, max_tokens, flat)
        expected = plan_flat_batch(queue, anchor, max_items, max_tokens)
        assert [(p.request_position, p.item_indices.tolist()) for p in planned] == [
            (p.request_position, p.item_indices.tolist()) for p in expected
        ]


def test_the_cost_model_refits_once_a_quarter_of_its_rows_is_new() -> None:
    """A few batches barely move a fit over hundreds: the planner's cost stays the fitted one
    until a quarter of the window is new, then follows the new timings (the ring wrapped)."""
    model = BatchCostModel(window=64, min_batches=8, refit_every=4)
    shapes = [(items, longest) for items in (1, 4, 8, 16) for longest in (16, 64, 128, 256)]
    for items, longest in shapes * 4:  # the window full: 5 ms a batch + 0.1 ms a token
        model.observe(items, longest, 0.005 + 0.0001 * items * longest)
    assert model.cost().overhead == pytest.approx(50, rel=0.01)
    for items, longest in shapes[:15]:  # a quarter of 64, less one: 20 ms a batch now
        model.observe(items, longest, 0.020 + 0.0001 * items * longest)
    assert model.cost().overhead == pytest.approx(50, rel=0.01)
    model.observe(*shapes[15], 0.020 + 0.0001 * shapes[15][0] * shapes[15][1])
    assert model.cost().overhead > 60  # refitted over the wrapped ring: the new rows count
