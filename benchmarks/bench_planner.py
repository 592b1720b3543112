"""How long planning one batch takes on the event loop: worst case over many plans.

    .venv/bin/python -m benchmarks.bench_planner

16 requests x 1,000 waiting items (equal, bimodal and long-tail lengths), batch 32, 64, 256
and 1,024; costs: CPU-like (measured overhead), flat (no timings yet: the length-grouping
programme with an unbounded overhead) and gpu (measured flat: whole requests in arrival
order). Prints median and worst milliseconds per plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from reranker.engine.batching import BatchCost, plan_batch

SHAPES = {
    "equal": lambda rng, n: np.full(n, 128),
    "bimodal": lambda rng, n: rng.permutation(np.r_[np.full(n // 2, 12), np.full(n - n // 2, 300)]),
    "long-tail": lambda rng, n: np.clip(rng.lognormal(4.0, 0.8, size=n).astype(int), 4, 512),
}


@dataclass
class Waiting:
    lengths: np.ndarray
    remaining: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = np.argsort(self.lengths, kind="stable")


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'lengths':<10} {'batch':>5} {'cost':<5} {'plans':>6} {'median ms':>10} {'worst ms':>9}")
    for name, make in SHAPES.items():
        for batch in (32, 64, 256, 1024):
            costs = (("cpu", BatchCost(64.0)), ("flat", BatchCost()), ("gpu", BatchCost(flat=True)))
            for cost_name, cost in costs:
                queue = [Waiting(make(rng, 1000)) for _ in range(16)]
                times = []
                for turn in range(40):
                    live = [w for w in queue if len(w.remaining)]
                    if not live:
                        break
                    started = time.perf_counter()
                    picks = plan_batch(live, turn % len(live), batch, 16_384 * 4, cost)
                    times.append((time.perf_counter() - started) * 1000)
                    for pick in picks:
                        request = live[pick.request_position]
                        request.remaining = request.remaining[~np.isin(request.remaining, pick.item_indices)]
                print(
                    f"{name:<10} {batch:>5} {cost_name:<5} {len(times):>6} "
                    f"{np.median(times):>10.2f} {max(times):>9.2f}"
                )


if __name__ == "__main__":
    main()
