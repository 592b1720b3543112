"""The one owner of all inference: admission, cross-request batching, parallelism.

Requests are admitted into a bounded queue (full: refused at once). One batcher
task cuts model batches from whatever is waiting (``batching.plan_batch``: fair
across requests, items of similar length together, within an item count and a
padded-token budget), and at most ``max_parallel`` batches run at once in worker
threads so the event loop never blocks. Each request awaits its own future; a
batch's failure reaches every request that had items in it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from reranker.backends.base import Backend, Encoded
from reranker.engine.adaptive import BatchSizer, is_out_of_memory
from reranker.engine.batching import BatchCostModel, plan_batch, plan_batch_in_arrival_order
from reranker.engine.metrics import Metrics
from reranker.errors import BackendError, NotReadyError, OverloadedError, RequestTimeoutError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    outputs: np.ndarray  # one row per submitted item, in submission order
    queue_ms: float  # admission until the request's first batch started
    inference_ms: float  # model time of the batches the request rode in
    batch_size: int  # the largest batch the request rode in


@dataclass(eq=False)
class _Pending:
    items: Sequence[Encoded]
    future: asyncio.Future[InferenceResult]
    admitted_at: float
    background: bool = False  # a job's slice: batched only when no interactive item waits
    lengths: np.ndarray = field(init=False)
    remaining: np.ndarray = field(init=False)  # undispatched item indices, shortest first
    completed: int = 0
    cancelled: bool = False
    outputs: np.ndarray | None = None
    first_batch_at: float | None = None
    inference_s: float = 0.0
    largest_batch: int = 0

    def __post_init__(self) -> None:
        self.lengths = np.fromiter((len(item) for item in self.items), dtype=np.int64, count=len(self.items))
        self.remaining = np.argsort(self.lengths, kind="stable")

    @property
    def undispatched(self) -> int:
        return len(self.remaining)


@dataclass(frozen=True, slots=True)
class _Slice:
    pending: _Pending
    indices: np.ndarray


@dataclass(slots=True)
class _Batch:
    slices: list[_Slice]
    items: list[Encoded]


class InferenceController:
    def __init__(
        self,
        backend: Backend,
        *,
        batch_size: int,
        max_parallel: int,
        max_queue: int,
        metrics: Metrics,
        max_batch_tokens: int | None = None,
        batch_wait_s: float = 0.0,
        group_by_length: bool = True,
        sizer: BatchSizer | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._backend = backend
        self._sizer = sizer or BatchSizer(batch_size, batch_size, adaptive=False, memory_limit_bytes=0)
        self._max_batch_tokens = max_batch_tokens
        self._batch_wait_s = batch_wait_s
        self._group_by_length = group_by_length
        self._turn = 0  # round-robin cursor over waiting requests (the batch anchor)
        self._cost = BatchCostModel()
        self._max_parallel = max_parallel
        self._max_queue = max_queue
        self._metrics = metrics
        self._clock = clock
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._accepting = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._slots = asyncio.Semaphore(max_parallel)
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(self._max_parallel, thread_name_prefix="inference")
        self._batcher = asyncio.get_running_loop().create_task(self._batch_loop(), name="batcher")
        self._accepting = True
        self._idle.set()

    def stop_admitting(self) -> None:
        self._accepting = False

    async def wait_idle(self) -> None:
        """Return once every admitted request has finished."""
        await self._idle.wait()

    async def close(self) -> None:
        self._accepting = False
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        for pending in list(self._queue):
            self._fail(pending, NotReadyError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- observation ----------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def batch_limit(self) -> int:
        """The most items the next batch may hold (adaptive under memory pressure)."""
        return self._sizer.limit

    @property
    def batch_overhead_tokens(self) -> float:
        """The learned fixed cost of a batch, in padded-token equivalents (what the planner uses)."""
        return self._cost.overhead_tokens()

    # ---- admission ------------------------------------------------------------------

    async def run(
        self, items: Sequence[Encoded], timeout_s: float, background: bool = False
    ) -> InferenceResult:
        """Run ``items`` through the model; raises Overloaded/Timeout/Backend errors.

        ``background`` work (asynchronous jobs) is batched only while no interactive item
        waits, and is not refused for a full queue (a job has one slice queued at a time).
        """
        if not self._accepting:
            raise NotReadyError("the server is not accepting work (loading or draining)")
        if not background and len(self._queue) >= self._max_queue:
            raise OverloadedError(
                f"queue full ({self._max_queue} requests waiting); retry later",
                retry_after_s=self._retry_after_s(),
            )
        if not items:
            return InferenceResult(np.zeros((0,), dtype=np.float32), 0.0, 0.0, 0)
        loop = asyncio.get_running_loop()
        pending = _Pending(
            items=items, future=loop.create_future(), admitted_at=self._clock(), background=background
        )
        self._queue.append(pending)
        self._idle.clear()
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except TimeoutError:
            self._abandon(pending)
            raise RequestTimeoutError(f"request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:  # the client went away
            self._abandon(pending)
            raise

    def _retry_after_s(self) -> int:
        waiting = sum(p.undispatched for p in self._queue)
        rate = self._metrics.items_per_second()
        return max(1, min(60, math.ceil(waiting / rate))) if rate > 0 else 1

    def _abandon(self, pending: _Pending) -> None:
        """Drop a request nobody waits for any more: its undispatched items cost nothing."""
        self._fail(pending, None)

    # ---- batching -------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            while not self._waiting_items():
                self._wake.clear()
                await self._wake.wait()
            if self._batch_wait_s > 0 and self._waiting_items() < self._sizer.limit:
                await asyncio.sleep(self._batch_wait_s)  # a short deadline for more items to arrive
            batch = self._next_batch()
            if batch is None:  # everything waiting was cancelled meanwhile
                self._slots.release()
                continue
            self._in_flight += 1
            started = self._clock()
            for piece in batch.slices:
                if piece.pending.first_batch_at is None:
                    piece.pending.first_batch_at = started
            work = loop.run_in_executor(self._executor, self._forward, batch.items)
            work.add_done_callback(lambda done, b=batch: self._finish(b, done))

    def _waiting_items(self) -> int:
        return sum(p.undispatched for p in self._queue if not p.cancelled)

    def _next_batch(self) -> _Batch | None:
        live = [p for p in self._queue if not p.cancelled and p.undispatched > 0]
        interactive = [p for p in live if not p.background]
        live = interactive or live  # jobs' items only when no request waits
        if not live:
            return None
        if self._group_by_length:
            anchor = self._turn % len(live)
            self._turn += 1
            picks = plan_batch(
                live, anchor, self._sizer.limit, self._max_batch_tokens, self._cost.overhead_tokens()
            )
        else:
            picks = plan_batch_in_arrival_order(live, self._sizer.limit, self._max_batch_tokens)
        batch = _Batch(slices=[], items=[])
        for pick in picks:
            pending = live[pick.request_position]
            batch.slices.append(_Slice(pending, pick.item_indices))
            batch.items.extend(pending.items[i] for i in pick.item_indices)
            pending.remaining = pending.remaining[~np.isin(pending.remaining, pick.item_indices)]
        self._queue = [p for p in self._queue if p.undispatched > 0 and not p.cancelled]
        return batch

    def _forward(self, items: list[Encoded]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        outputs = self._backend.forward(items)
        return outputs, time.perf_counter() - started

    def _finish(self, batch: _Batch, done: asyncio.Future[tuple[np.ndarray, float]]) -> None:
        self._in_flight -= 1
        self._slots.release()
        try:
            if done.cancelled():
                error: BaseException | None = NotReadyError("the server is shutting down")
            else:
                error = done.exception()
            oom_retry = error is not None and is_out_of_memory(error)
            if oom_retry and self._sizer.after_out_of_memory(len(batch.items), error):
                self._requeue(batch)
                return
            if error is not None:
                log.error("model batch of %d items failed: %r", len(batch.items), error)
                failure = BackendError(f"model batch failed ({type(error).__name__})")
                for piece in batch.slices:
                    self._fail(piece.pending, failure)
                return
            outputs, seconds = done.result()
            lengths = [len(item) for item in batch.items]
            self._metrics.record_batch(lengths, seconds)
            self._cost.observe(max(lengths) * len(lengths), seconds)
            self._sizer.after_batch(len(lengths))
            offset = 0
            for piece in batch.slices:
                count = len(piece.indices)
                self._deliver(piece, outputs[offset : offset + count], seconds, len(batch.items))
                offset += count
        except Exception:  # never leave waiters hanging on a bookkeeping bug
            log.exception("failed to deliver a batch's results")
            for piece in batch.slices:
                self._fail(piece.pending, BackendError("internal error while delivering results"))
        finally:
            self._update_idle()

    def _requeue(self, batch: _Batch) -> None:
        """Put a failed batch's items back in the queue, ahead of newer requests."""
        for piece in reversed(batch.slices):
            pending = piece.pending
            if pending.cancelled:
                continue
            merged = np.concatenate([pending.remaining, piece.indices])
            pending.remaining = merged[np.argsort(pending.lengths[merged], kind="stable")]
            if pending not in self._queue:
                self._queue.insert(0, pending)
        self._wake.set()

    def _deliver(self, piece: _Slice, rows: np.ndarray, seconds: float, batch_size: int) -> None:
        pending = piece.pending
        if pending.cancelled:
            return
        if pending.outputs is None:
            pending.outputs = np.empty((len(pending.items), *rows.shape[1:]), dtype=rows.dtype)
        pending.outputs[piece.indices] = rows
        pending.completed += len(piece.indices)
        pending.inference_s += seconds
        pending.largest_batch = max(pending.largest_batch, batch_size)
        if pending.completed == len(pending.items) and not pending.future.done():
            first = pending.first_batch_at if pending.first_batch_at is not None else pending.admitted_at
            pending.future.set_result(
                InferenceResult(
                    outputs=pending.outputs,
                    queue_ms=(first - pending.admitted_at) * 1000.0,
                    inference_ms=pending.inference_s * 1000.0,
                    batch_size=pending.largest_batch,
                )
            )

    def _fail(self, pending: _Pending, error: BaseException | None) -> None:
        """Take a request out of the queue; its waiter gets ``error`` (None: cancelled)."""
        pending.cancelled = True
        if pending in self._queue:
            self._queue.remove(pending)
        if not pending.future.done():
            if error is None:
                pending.future.cancel()
            else:
                pending.future.set_exception(error)
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._queue and self._in_flight == 0:
            self._idle.set()
