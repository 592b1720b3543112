"""The batch planner: budget, length grouping and fairness, on plain numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from reranker.engine.batching import plan_batch, plan_batch_in_arrival_order


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
    picks = plan_batch(queue, anchor=0, max_items=32, overhead_tokens=64)
    assert chosen_lengths(queue, picks) == [10] * 8
    many = waiting([10] * 8 + [12])
    assert len(chosen_lengths(many, plan_batch(many, anchor=0, max_items=32))) == 9


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
    from reranker.engine.batching import BatchCostModel

    model = BatchCostModel()
    for padded in range(100, 3300, 100):
        model.observe(padded, 0.005 + 0.0001 * padded)  # 5 ms + 0.1 ms per token
    assert model.overhead_tokens() == pytest.approx(50, rel=0.01)


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
