"""The concurrency controller on the deterministic fake backend (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import pytest

from reranker.backends.base import Encoded
from reranker.backends.fake import FakeBackend, SimulatedClock, cpu_like, gpu_like
from reranker.engine.controller import InferenceController
from reranker.engine.metrics import Metrics
from reranker.engine.model import calibration_batches
from reranker.errors import BackendError, NotReadyError, OverloadedError, RequestTimeoutError


def texts(prefix: str, count: int) -> list[str]:
    return [f"{prefix} word{i} extra{i % 3} filler" for i in range(count)]


async def with_controller(
    backend: FakeBackend,
    body: Callable[[InferenceController], Awaitable[None]],
    *,
    batch_size: int = 4,
    max_parallel: int = 1,
    max_queue: int = 8,
    **options: object,
) -> None:
    controller = InferenceController(
        backend,
        batch_size=batch_size,
        max_parallel=max_parallel,
        max_queue=max_queue,
        metrics=Metrics(),
        **options,
    )
    controller.start()
    try:
        await body(controller)
    finally:
        await controller.close()


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds (bounded)."""
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def test_concurrent_requests_share_batches_of_at_most_batch_size() -> None:
    backend = FakeBackend()
    backend.gate.clear()  # hold the first batch so the rest queue up behind it

    async def body(controller: InferenceController) -> None:
        requests = [backend.tokenize_texts(texts(f"r{i}", 3)) for i in range(5)]
        tasks = [asyncio.create_task(controller.run(items, 10)) for items in requests]
        await until(lambda: controller.queued == 4 and controller.in_flight == 1)
        backend.gate.set()
        results = await asyncio.gather(*tasks)
        ran = list(backend.batches)
        assert all(len(batch) <= 4 for batch in ran)
        assert sum(len(batch) for batch in ran) == 15  # every item ran, none twice
        assert len(ran) == 4  # 1 batch alone, then 12 queued items merged into 3 full batches
        for items, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result.outputs, backend.forward(items))

    asyncio.run(with_controller(backend, body, batch_size=4))


def test_result_is_identical_alone_and_batched_with_others() -> None:
    backend = FakeBackend()
    target = backend.tokenize_texts(texts("target", 5))

    async def body(controller: InferenceController) -> None:
        alone = await controller.run(target, 10)
        others = [controller.run(backend.tokenize_texts(texts(f"o{i}", 7)), 10) for i in range(16)]
        crowded, *_ = await asyncio.gather(controller.run(target, 10), *others)
        np.testing.assert_array_equal(alone.outputs, crowded.outputs)

    asyncio.run(with_controller(backend, body, batch_size=8, max_queue=32))


def test_a_traced_request_lists_the_batches_it_rode_in_and_an_untraced_one_nothing() -> None:
    backend = FakeBackend()
    backend.gate.clear()  # hold the first batch: the two requests then share batches

    async def body(controller: InferenceController) -> None:
        first = asyncio.create_task(controller.run(backend.tokenize_texts(texts("a", 1)), 10))
        await until(lambda: controller.in_flight == 1)
        traced = backend.tokenize_texts(texts("t", 7))
        tasks = [
            asyncio.create_task(controller.run(traced, 10, traced=True)),
            asyncio.create_task(controller.run(backend.tokenize_texts(texts("u", 3)), 10)),
        ]
        await until(lambda: controller.queued == 2)
        backend.gate.set()
        (traced_result, untraced_result), _ = await asyncio.gather(*tasks), await first
        assert untraced_result.batch_log is None
        log = traced_result.batch_log
        assert len(log) == traced_result.batches >= 2 and sum(b.items for b in log) == 7
        assert max(b.size for b in log) == traced_result.batch_size
        for batch in log:
            assert batch.padded_tokens >= batch.tokens > 0 and batch.started <= batch.ended
        first_started = traced_result.admitted_at + traced_result.queue_ms / 1000.0
        assert min(b.started for b in log) == pytest.approx(first_started, abs=1e-9)

    asyncio.run(with_controller(backend, body, batch_size=4))


def test_full_queue_refuses_at_once_with_retry_after() -> None:
    backend = FakeBackend()
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        first = asyncio.create_task(controller.run(backend.tokenize_texts(["a b"]), 10))
        await until(lambda: controller.in_flight == 1)
        waiting = [asyncio.create_task(controller.run(backend.tokenize_texts(["c d"]), 10)) for _ in range(2)]
        await until(lambda: controller.queued == 2)
        with pytest.raises(OverloadedError) as refused:
            await controller.run(backend.tokenize_texts(["e f"]), 10)
        assert refused.value.retry_after_s >= 1
        backend.gate.set()
        await asyncio.gather(first, *waiting)

    asyncio.run(with_controller(backend, body, max_queue=2))


def test_batch_failure_reaches_every_waiter_of_that_batch_only() -> None:
    def fail_on_poison(batch: Sequence[Encoded]) -> Exception | None:
        poison = backend.tokenize_texts(["poison"])[0].ids[0]
        return RuntimeError("boom") if any(poison in item.ids for item in batch) else None

    backend = FakeBackend(fail_when=fail_on_poison)
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        blocker = asyncio.create_task(controller.run(backend.tokenize_texts(["x y"]), 10))
        await until(lambda: controller.in_flight == 1)
        # These two share the next batch (batch_size 4); the third rides alone after it.
        poisoned = asyncio.create_task(controller.run(backend.tokenize_texts(["poison", "a"]), 10))
        neighbour = asyncio.create_task(controller.run(backend.tokenize_texts(["b", "c"]), 10))
        await until(lambda: controller.queued == 2)
        backend.gate.set()
        await blocker
        with pytest.raises(BackendError):
            await poisoned
        with pytest.raises(BackendError):
            await neighbour
        later = await controller.run(backend.tokenize_texts(["still", "works"]), 10)
        assert later.outputs.shape == (2, 8)

    asyncio.run(with_controller(backend, body))


def test_timed_out_request_is_dropped_before_it_costs_compute() -> None:
    backend = FakeBackend()
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        blocker = asyncio.create_task(controller.run(backend.tokenize_texts(["x"]), 10))
        await until(lambda: controller.in_flight == 1)
        with pytest.raises(RequestTimeoutError):
            await controller.run(backend.tokenize_texts(["never run"] * 3), timeout_s=0.05)
        assert controller.queued == 0
        backend.gate.set()
        await blocker
        assert backend.batches == [[1]]  # the timed-out items never reached the model

    asyncio.run(with_controller(backend, body))


def test_cancelled_request_is_dropped_before_it_costs_compute() -> None:
    backend = FakeBackend()
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        blocker = asyncio.create_task(controller.run(backend.tokenize_texts(["x"]), 10))
        await until(lambda: controller.in_flight == 1)
        gone = asyncio.create_task(controller.run(backend.tokenize_texts(["client left"] * 3), 10))
        await until(lambda: controller.queued == 1)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        backend.gate.set()
        await blocker
        assert backend.batches == [[1]]

    asyncio.run(with_controller(backend, body))


def test_small_request_is_not_starved_by_a_big_one() -> None:
    backend = FakeBackend()
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        big = asyncio.create_task(controller.run(backend.tokenize_texts(texts("big", 40)), 10))
        await until(lambda: controller.in_flight == 1)
        small = asyncio.create_task(controller.run(backend.tokenize_texts(["tiny request here"]), 10))
        await until(lambda: controller.queued == 2)
        backend.gate.set()
        await small
        assert not big.done()
        await big
        # The small request (3 tokens; the big one's items have 4) rode in the first or second
        # batch, not after the big request's ten.
        assert any(3 in batch for batch in backend.batches[:2])

    asyncio.run(with_controller(backend, body))


def run_mixed_traffic(
    grouping: bool,
    budget: int | None = None,
    device=cpu_like,
    requests: int = 12,
    texts_each: int = 6,
    batch_size: int = 16,
) -> list[list[int]]:
    """Requests of texts of 2-59 tokens admitted behind a held batch, on a device whose batch
    cost follows ``device`` (the controller calibrates on it first); the batches that ran."""
    clock = SimulatedClock()
    backend = FakeBackend(cost=device, clock=clock)
    rng = np.random.default_rng(7)
    waiting = [
        backend.tokenize_texts([" ".join(["w"] * int(n)) for n in rng.integers(2, 60, size=texts_each)])
        for _ in range(requests)
    ]

    async def body(controller: InferenceController) -> None:
        controller.calibrate(calibration_batches(backend, batch_size))
        del backend.batches[:]
        backend.gate.clear()
        tasks = [asyncio.create_task(controller.run(items, 10)) for items in waiting]
        try:  # every request is admitted while the first batch is held
            await until(backend.batch_started.is_set)
        finally:
            backend.gate.set()
        await asyncio.gather(*tasks)

    options = {"max_batch_tokens": budget, "group_by_length": grouping, "clock": clock}
    asyncio.run(with_controller(backend, body, batch_size=batch_size, max_queue=requests, **options))
    return backend.batches


@pytest.mark.parametrize("grouping", [True, False])
def test_controller_batches_respect_the_token_budget(grouping: bool) -> None:
    batches = run_mixed_traffic(grouping, budget=200)
    assert sum(len(b) for b in batches) == 72
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) == 1 or max(batch) * len(batch) <= 200, batch


def test_length_grouping_pads_less_than_arrival_order() -> None:
    """Same mixed traffic: grouped batches waste far fewer padded tokens."""
    efficiency = {}
    for grouping in (True, False):
        queued_batches = run_mixed_traffic(grouping)[1:]  # the first was cut before the rest arrived
        real = sum(sum(b) for b in queued_batches)
        efficiency[grouping] = real / sum(max(b) * len(b) for b in queued_batches)
    assert efficiency[True] > 0.85 > 0.7 > efficiency[False], efficiency


def test_gpu_like_device_runs_full_batches_at_saturation() -> None:
    """On a flat-cost device the learned overhead is unbounded: batches fill whatever the lengths."""
    first, *batches = run_mixed_traffic(True, device=gpu_like, requests=16, texts_each=40)
    assert sum(len(b) for b in batches) == 16 * 40 - len(first)
    assert np.mean([len(b) for b in batches]) >= 0.9 * 16, [len(b) for b in batches]


class SteppedDevice(FakeBackend):
    """A flat-cost fake device whose every batch waits for a permit from the test: the test lets
    a batch run only once every client that was answered has sent its next request, which is
    what a device slower than the engine sees (the engine is never the limit)."""

    def __init__(self) -> None:
        self.clock = SimulatedClock()
        super().__init__(cost=gpu_like, clock=self.clock, max_length=128)
        self.permits = threading.Semaphore(0)
        self.arrived = 0  # batches that reached the device

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        with self._lock:
            self.arrived += 1
        self.permits.acquire()
        return super().forward(batch)


@pytest.mark.parametrize("clients", [16, 64])
def test_closed_loop_clients_keep_a_flat_cost_device_s_batches_full(clients: int) -> None:
    """Clients that each send 8 texts of 20-60 tokens again as soon as they are answered (what
    load tests and busy services do), on a flat-cost device slower than the engine: the batches
    the device recorded average at least 0.9 x BATCH_SIZE, the tail of the run (the queue
    draining) included."""
    backend = SteppedDevice()
    rng = np.random.default_rng(11)
    requests = [
        backend.tokenize_texts([" ".join(["w"] * int(n)) for n in rng.integers(20, 61, size=8)])
        for _ in range(clients)
    ]
    rounds = 1600 // clients  # 12,800 items: 400 full batches
    state = {"waiting": 0, "done": 0}

    async def client(controller: InferenceController, items: Sequence[Encoded]) -> None:
        for _ in range(rounds):
            state["waiting"] += 1
            await controller.run(items, 10)
            state["waiting"] -= 1
        state["done"] += 1

    async def device(controller: InferenceController) -> None:
        released = [0]
        while state["done"] < clients:
            # A batch waits at the device and every unfinished client has its request in.
            await until(
                lambda: (
                    state["done"] == clients
                    or (backend.arrived > released[0] and state["waiting"] + state["done"] == clients)
                )
            )
            if backend.arrived > released[0]:
                released[0] += 1
                backend.permits.release()

    async def body(controller: InferenceController) -> None:
        await asyncio.gather(device(controller), *(client(controller, items) for items in requests))

    asyncio.run(with_controller(backend, body, batch_size=32, max_queue=clients, clock=backend.clock))
    sizes = [len(batch) for batch in backend.batches]
    assert sum(sizes) == clients * rounds * 8
    assert np.mean(sizes) >= 0.9 * 32, sizes


def test_cpu_like_device_splits_by_length_where_padding_costs_more_than_a_batch() -> None:
    batches = run_mixed_traffic(True, device=cpu_like, requests=16, texts_each=40)[1:]
    gpu = run_mixed_traffic(True, device=gpu_like, requests=16, texts_each=40)[1:]
    padded = {name: sum(max(b) * len(b) for b in ran) for name, ran in (("cpu", batches), ("gpu", gpu))}
    assert len(batches) > len(gpu) and padded["cpu"] < padded["gpu"]


def test_a_thousand_equal_length_items_run_in_full_batches() -> None:
    for device in (cpu_like, gpu_like):
        clock = SimulatedClock()
        backend = FakeBackend(cost=device, clock=clock)
        items = backend.tokenize_texts([f"chunk {i} of the same length" for i in range(1000)])

        async def body(controller: InferenceController, backend=backend, items=items) -> None:
            controller.calibrate(calibration_batches(backend, 32))
            del backend.batches[:]
            result = await controller.run(items, 10)
            assert result.batches == len(backend.batches)

        asyncio.run(with_controller(backend, body, batch_size=32, clock=clock))
        assert len(backend.batches) == 32, [len(b) for b in backend.batches]
        assert sorted(len(b) for b in backend.batches)[1:] == [32] * 31


def test_a_request_making_progress_outlives_the_timeout_and_a_stalled_one_does_not() -> None:
    """REQUEST_TIMEOUT_S bounds waiting, not computing: 0.3 s of timeout, 40 batches of 0.02 s."""
    slow = threading_gate_delay(0.02)
    backend = FakeBackend(fail_when=slow)

    async def body(controller: InferenceController) -> None:
        items = backend.tokenize_texts(texts("long job", 160))
        result = await controller.run(items, timeout_s=0.3)
        assert result.outputs.shape == (160, 8) and result.batches == 40
        backend.gate.clear()  # the model hangs from now on
        try:
            with pytest.raises(RequestTimeoutError) as stuck:
                await controller.run(backend.tokenize_texts(["stuck"]), 0.2)
        finally:
            backend.gate.set()
        assert "made no progress" in stuck.value.message

    asyncio.run(with_controller(backend, body, batch_size=4))


def threading_gate_delay(seconds: float):
    """A fail_when hook that makes each batch take ``seconds`` of real time (a slow model)."""
    import time as real_time

    def delay(batch: Sequence[Encoded]) -> None:
        real_time.sleep(seconds)
        return None

    return delay


def test_timeout_messages_say_what_waited_and_which_variable_to_change() -> None:
    backend = FakeBackend()
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        running = asyncio.create_task(controller.run(backend.tokenize_texts(["first"]), 0.1))
        await until(lambda: controller.in_flight == 1)
        try:
            with pytest.raises(RequestTimeoutError) as waited:
                await controller.run(backend.tokenize_texts(["second", "third"]), timeout_s=0.1)
            with pytest.raises(RequestTimeoutError) as stalled:
                await running
        finally:
            backend.gate.set()
        assert "none of its 2 items could start within REQUEST_TIMEOUT_S=0.1 s" in waited.value.message
        assert "no progress on it for REQUEST_TIMEOUT_S=0.1 s (0/1 items done)" in stalled.value.message
        assert "/v1/jobs" in waited.value.message and "/v1/jobs" in stalled.value.message

    asyncio.run(with_controller(backend, body))


def test_queue_full_message_names_the_variable_and_points_to_jobs() -> None:
    backend = FakeBackend()
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        first = asyncio.create_task(controller.run(backend.tokenize_texts(["a"]), 10))
        await until(lambda: controller.in_flight == 1)
        second = asyncio.create_task(controller.run(backend.tokenize_texts(["b"]), 10))
        await until(lambda: controller.queued == 1)
        with pytest.raises(OverloadedError) as refused:
            await controller.run(backend.tokenize_texts(["c"]), 10)
        backend.gate.set()
        await asyncio.gather(first, second)
        assert "MAX_QUEUE_SIZE=1" in refused.value.message and "/v1/jobs" in refused.value.message

    asyncio.run(with_controller(backend, body, max_queue=1))


def test_a_dead_batcher_fails_waiting_requests_at_once_and_refuses_new_ones() -> None:
    backend = FakeBackend()
    backend.gate.clear()

    async def body(controller: InferenceController) -> None:
        first = asyncio.create_task(controller.run(backend.tokenize_texts(["a"]), 60))
        await until(lambda: controller.in_flight == 1)
        waiting = asyncio.create_task(controller.run(backend.tokenize_texts(["b"]), 60))
        await until(lambda: controller.queued == 1)
        controller._batcher.cancel()  # the task dies (as it would on a bug)
        with pytest.raises(BackendError) as failed:
            await waiting  # at once, not after its 60 s timeout
        assert "batcher" in failed.value.message and controller.failure
        with pytest.raises(BackendError):
            await controller.run(backend.tokenize_texts(["c"]), 60)
        backend.gate.set()
        await first  # the batch that was running still delivers

    asyncio.run(with_controller(backend, body))


def test_stop_admitting_refuses_with_not_ready() -> None:
    backend = FakeBackend()

    async def body(controller: InferenceController) -> None:
        controller.stop_admitting()
        with pytest.raises(NotReadyError):
            await controller.run(backend.tokenize_texts(["a"]), 1)

    asyncio.run(with_controller(backend, body))


def test_close_waits_for_the_batch_in_flight_without_blocking_the_event_loop() -> None:
    """Issue 22: close() joined the executor on the event loop, which stood still until the
    batch in flight finished (every other request, probe and timer with it)."""
    backend = FakeBackend()
    backend.gate.clear()
    loop_ran_while_closing = threading.Event()

    def open_gate() -> None:  # the batch finishes once the loop is seen running (5 s: the bug)
        loop_ran_while_closing.wait(timeout=5)
        backend.gate.set()

    async def body(controller: InferenceController) -> None:
        running = asyncio.create_task(controller.run(backend.tokenize_texts(["a"]), 60))
        await until(lambda: controller.in_flight == 1)
        threading.Thread(target=open_gate, daemon=True).start()
        executor = controller._executor
        closing = asyncio.create_task(controller.close())
        await until(lambda: executor._shutdown)  # close() is joining the executor's threads
        was_open = backend.gate.is_set()
        loop_ran_while_closing.set()  # the loop ran on while close() waited
        await closing
        await asyncio.gather(running, return_exceptions=True)
        assert not was_open, "the loop stood still until the batch in flight finished"

    asyncio.run(with_controller(backend, body))
