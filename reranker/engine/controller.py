"""The one owner of all inference: admission, cross-request batching, parallelism.

Requests are admitted into a bounded queue (full: refused at once). One batcher
task cuts model batches from whatever is waiting (``batching.plan_batch``: fair
across requests, items of similar length together, full batches whenever enough
waits, within an item count and a padded-token budget), and at most
``max_parallel`` batches run at once in worker threads so the event loop never
blocks. Each request awaits its own future; a batch's failure reaches every
request that had items in it.

A request times out for waiting, not for computing: it gets 504 when none of its
batches started or finished for ``timeout_s`` (so a 10,000-item request that keeps
moving completes, and one stuck behind a hung model does not wait forever). If the
batcher task itself dies, the controller is broken: waiting requests fail at once
and ``failure`` says why (the runtime reports unhealthy so a supervisor restarts us).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from reranker.backends.base import Backend, Encoded
from reranker.engine.adaptive import BatchSizer, is_out_of_memory
from reranker.engine.batching import BatchCost, BatchCostModel, plan_batch, plan_batch_in_arrival_order
from reranker.engine.metrics import Metrics
from reranker.errors import (
    BackendError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
)

log = logging.getLogger(__name__)

# Set by a job's slice runner: background work whose job no longer wants it is dropped when the
# next batch is planned, so a cancelled job's queued slice never reaches the model.
background_wanted: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "background_wanted", default=None
)


class DeviceGate:
    """The model batches the whole server runs at once, shared by every model's controller (the
    CPU threads or the GPU are one). First come, first served across models: a burst on one
    model delays another model's next batch by at most the batches already running."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted as it was cancelled: pass the slot on
            elif waiter in self._waiters:  # release() may have dropped it already
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class BatchRecord(NamedTuple):
    """One model batch a traced request rode in (times in the controller's clock)."""

    started: float
    ended: float
    size: int
    padded_tokens: int  # longest x size: what the model computes
    tokens: int
    items: int  # the request's own items in it

    @classmethod
    def of(cls, started: float, ended: float, lengths: list[int], items: int) -> BatchRecord:
        return cls(started, ended, len(lengths), max(lengths) * len(lengths), sum(lengths), items)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    outputs: np.ndarray  # one row per submitted item, in submission order
    queue_ms: float  # admission until the request's first batch started
    inference_ms: float  # model time of the batches the request rode in
    batch_size: int  # the largest batch the request rode in
    batches: int = 0  # how many model batches the request's items rode in
    admitted_at: float = 0.0
    batch_log: list[BatchRecord] | None = None  # traced requests only (run's ``traced``)


@dataclass(eq=False)
class _Pending:
    items: Sequence[Encoded]
    future: asyncio.Future[InferenceResult]
    admitted_at: float
    background: bool = False  # a job's slice: batched only when no interactive item waits
    wanted: Callable[[], bool] | None = None  # background work: False once its job is cancelled
    lengths: np.ndarray = field(init=False)
    remaining: np.ndarray = field(init=False)  # undispatched item indices, shortest first
    completed: int = 0
    cancelled: bool = False
    outputs: np.ndarray | None = None
    first_batch_at: float | None = None
    last_progress: float = 0.0  # event-loop time of admission or of its last batch start/finish
    inference_s: float = 0.0
    largest_batch: int = 0
    batches: int = 0
    timer: asyncio.TimerHandle | None = None  # the waiting deadline's check
    batch_log: list[BatchRecord] | None = None  # a list only when the request is traced

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
    started: float = 0.0


def _without(remaining: np.ndarray, taken: np.ndarray, count: int) -> np.ndarray:
    """``remaining`` less ``taken`` (indices below ``count``), order kept: a prefix is a slice,
    anything else one boolean mask (np.isin sorts both arrays: costly for a few items)."""
    if len(taken) == len(remaining):  # all of them (``taken`` is drawn from ``remaining``)
        return remaining[:0]
    if len(taken) < len(remaining) and np.array_equal(remaining[: len(taken)], taken):
        return remaining[len(taken) :]
    keep = np.ones(count, dtype=bool)
    keep[taken] = False
    return remaining[keep[remaining]]


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
        interactive_recent_s: float = 2.0,
        max_request_s: float | None = None,
        on_idle: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        gate: DeviceGate | None = None,
    ) -> None:
        self._backend = backend
        self._sizer = sizer or BatchSizer(batch_size, batch_size, adaptive=False, memory_limit_bytes=0)
        self._max_batch_tokens = max_batch_tokens
        self._batch_wait_s = batch_wait_s
        self._group_by_length = group_by_length
        self._turn = 0  # round-robin cursor over waiting requests (the batch anchor)
        self._interactive_recent_s = interactive_recent_s
        self._max_request_s = max_request_s
        self._on_idle = on_idle  # told how many items ran since the last idle moment
        self._items_since_idle = 0
        self._last_interactive = -math.inf  # event-loop time an interactive request last arrived
        self._cost = BatchCostModel()
        self._max_parallel = max_parallel if getattr(backend, "runs_batches_concurrently", True) else 1
        self._max_queue = max_queue
        self._metrics = metrics
        self._clock = clock
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._accepting = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._slots = asyncio.Semaphore(self._max_parallel)  # this model's batches at once
        self._gate = gate or DeviceGate(max_parallel)  # the server's, shared with its other models
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: asyncio.Task[None] | None = None
        self.failure: str | None = None  # set when the batcher died: the controller is broken

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def max_parallel(self) -> int:
        """Batches of this model at once: MAX_PARALLEL_REQUESTS, or 1 for a backend that runs one."""
        return self._max_parallel

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(self._max_parallel, thread_name_prefix="inference")
        self._batcher = asyncio.get_running_loop().create_task(self._batch_loop(), name="batcher")
        self._batcher.add_done_callback(self._batcher_ended)
        self._accepting = True
        self._idle.set()

    def calibrate(self, batches: Sequence[Sequence[Encoded]], rounds: int = 2) -> None:
        """Time batches of chosen shapes so the cost model starts from measurements, not from
        its own choices. Blocking: call before ``start`` or off the event loop."""
        for _ in range(rounds):
            for batch in batches:
                _, seconds = self._forward(list(batch))
                self._cost.observe(len(batch), max(len(item) for item in batch), seconds)

    def _batcher_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and not self._accepting:
            return  # closed on purpose
        error = None if task.cancelled() else task.exception()
        self.failure = f"the batcher task stopped: {error!r}" if error else "the batcher task was cancelled"
        log.error("%s; the controller fails every request from now on", self.failure)
        self._accepting = False
        for pending in list(self._queue):
            self._fail(pending, BackendError(f"internal error: {self.failure}"))

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
        if self._executor is not None:  # waits for the batch in flight: in a thread, not on the loop
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

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
    def batch_cost(self) -> BatchCost:
        """The learned cost of a batch, in padded-token equivalents (what the planner uses)."""
        return self._cost.cost()

    # ---- admission ------------------------------------------------------------------

    async def run(
        self,
        items: Sequence[Encoded],
        timeout_s: float,
        background: bool = False,
        timeout_name: str = "REQUEST_TIMEOUT_S",
        arrived_at: float | None = None,
        traced: bool = False,
    ) -> InferenceResult:
        """Run ``items`` through the model; raises Overloaded/Timeout/Backend errors.

        ``timeout_s`` bounds waiting: the request ends with 504 once none of its batches
        started or finished for that long, counted from ``arrived_at`` (event-loop time; default:
        now) so the time its tokenization took counts too. ``background`` work (asynchronous jobs) is batched
        only while no interactive item waits, and is not refused for a full queue (a job has
        at most two slices queued at a time). ``traced``: the result lists its batches (``batch_log``).
        """
        self.admit(background)
        if not items:
            return InferenceResult(np.zeros((0,), dtype=np.float32), 0.0, 0.0, 0)
        if not background:
            self._refuse_if_too_long(len(items))
        loop = asyncio.get_running_loop()
        pending = _Pending(
            items=items,
            future=loop.create_future(),
            admitted_at=self._clock(),
            background=background,
            wanted=background_wanted.get() if background else None,
            batch_log=[] if traced else None,
        )
        pending.last_progress = loop.time() if arrived_at is None else arrived_at
        if not background:
            self._last_interactive = pending.last_progress
        self._queue.append(pending)
        self._idle.clear()
        self._wake.set()
        # One timer per request, moved on while its batches progress (no wait_for/shield per request).
        pending.timer = loop.call_at(
            pending.last_progress + timeout_s, self._check_waiting, pending, timeout_s, timeout_name
        )
        try:
            return await pending.future
        except asyncio.CancelledError:  # the client went away (or its job was cancelled)
            self._abandon(pending)
            raise
        finally:
            if pending.timer is not None:
                pending.timer.cancel()

    def admit(self, background: bool = False) -> None:
        """Raise what ``run`` would refuse with now (broken, not accepting, the queue full): the
        service asks before it tokenizes, so a refusal costs no tokenizer time and never waits
        for a tokenizing thread."""
        if self.failure is not None:
            raise BackendError(f"internal error: {self.failure}")
        if not self._accepting:
            raise NotReadyError("the server is not accepting work (loading or draining)")
        if not background and len(self._queue) >= self._max_queue:
            retry_after = self._retry_after_s()
            raise OverloadedError(
                f"queue full: MAX_QUEUE_SIZE={self._max_queue} requests are waiting; retry after "
                f"{retry_after} s, raise MAX_QUEUE_SIZE, or submit big batches to /v1/jobs",
                retry_after_s=retry_after,
            )

    def _check_waiting(self, pending: _Pending, timeout_s: float, timeout_name: str) -> None:
        """The request's waiting deadline: fail it with a timeout if none of its batches started or
        finished for ``timeout_s``, else look again at the deadline its last progress set."""
        if pending.future.done():
            return
        loop = pending.future.get_loop()
        deadline = pending.last_progress + timeout_s
        if deadline > loop.time():
            pending.timer = loop.call_at(deadline, self._check_waiting, pending, timeout_s, timeout_name)
            return
        self._fail(pending, RequestTimeoutError(self._timeout_message(pending, timeout_s, timeout_name)))

    def _timeout_message(self, pending: _Pending, timeout_s: float, name: str) -> str:
        done, total = pending.completed, len(pending.items)
        if pending.first_batch_at is None:
            ahead = sum(p.undispatched for p in self._queue if p is not pending)
            what = f"none of its {total} items could start within {name}={timeout_s:g} s"
            what += f" ({ahead} items ahead)"
        else:
            what = f"the model made no progress on it for {name}={timeout_s:g} s"
            what += f" ({done}/{total} items done)"
        return f"{what}; raise {name}, add capacity, or submit big batches to /v1/jobs"

    def _refuse_if_too_long(self, count: int) -> None:
        """Refuse at once a request whose model time, at the measured rate, would pass
        ``max_request_s``: 413 if it alone would, 503 + Retry-After if the work ahead makes it."""
        rate = self._metrics.items_per_second()
        if self._max_request_s is None or rate <= 0:
            return
        ahead = sum(p.undispatched for p in self._queue if not p.background)
        alone_s, total_s = count / rate, (count + ahead) / rate
        jobs = "submit it to /v1/jobs, which has no such limit"
        if alone_s > self._max_request_s:
            raise PayloadTooLargeError(
                f"{count} items would take about {alone_s:.0f} s of model time at the measured "
                f"{rate:.0f} items/s, over MAX_REQUEST_SECONDS={self._max_request_s:g}; split it or {jobs}"
            )
        if total_s > self._max_request_s:
            raise OverloadedError(
                f"{ahead} items are waiting ahead: this request would take about {total_s:.0f} s, over "
                f"MAX_REQUEST_SECONDS={self._max_request_s:g}; retry later or {jobs}",
                retry_after_s=max(1, min(60, math.ceil(ahead / rate))),
            )

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
            await self._gate.acquire()  # after the wait: an idle wait never holds the shared device
            try:
                batch = self._next_batch()
            except BaseException:
                self._gate.release()
                raise
            if batch is None:  # everything waiting was cancelled meanwhile
                self._gate.release()
                self._slots.release()
                continue
            self._in_flight += 1
            started, now = self._clock(), loop.time()
            batch.started = started
            for piece in batch.slices:
                piece.pending.last_progress = now
                if piece.pending.first_batch_at is None:
                    piece.pending.first_batch_at = started
            try:
                work = loop.run_in_executor(self._executor, self._forward, batch.items)
            except BaseException:  # the executor is shut down: the batch never runs
                self._in_flight -= 1
                self._gate.release()
                for piece in batch.slices:
                    self._fail(piece.pending, NotReadyError("the server is shutting down"))
                raise
            work.add_done_callback(lambda done, b=batch: self._finish(b, done))

    def _waiting_items(self) -> int:
        return sum(p.undispatched for p in self._queue if not p.cancelled)

    def _next_batch(self) -> _Batch | None:
        for pending in list(self._queue):
            if pending.wanted is not None and not pending.wanted():
                self._fail(pending, None)  # its job was cancelled: the waiter sees CancelledError
        live = [p for p in self._queue if not p.cancelled and p.undispatched > 0]
        interactive = [p for p in live if not p.background]
        live = interactive or live  # jobs' items only when no request waits
        if not live:
            return None
        limit = self._sizer.limit
        if not interactive and asyncio.get_running_loop().time() - self._last_interactive < (
            self._interactive_recent_s
        ):
            # Job work while requests keep coming: short batches, so the next request waits
            # at most for a quarter batch. On an idle server job batches are full.
            limit = max(1, limit // 4)
        if self._group_by_length:
            # Every other batch is anchored on the request with the fewest items left, so a
            # small request waits for at most the running batch and one more, whatever big work
            # is queued; the others go round-robin, so no request starves.
            if self._turn % 2 == 0:
                anchor = min(range(len(live)), key=lambda i: live[i].undispatched)
            else:
                anchor = (self._turn // 2) % len(live)
            self._turn += 1
            picks = plan_batch(live, anchor, limit, self._max_batch_tokens, self._cost.cost())
        else:
            picks = plan_batch_in_arrival_order(live, limit, self._max_batch_tokens)
        batch = _Batch(slices=[], items=[])
        for pick in picks:
            pending = live[pick.request_position]
            batch.slices.append(_Slice(pending, pick.item_indices))
            items = pending.items
            batch.items.extend([items[i] for i in pick.item_indices.tolist()])
            pending.remaining = _without(pending.remaining, pick.item_indices, len(pending.items))
        self._queue = [p for p in self._queue if p.undispatched > 0 and not p.cancelled]
        return batch

    def _forward(self, items: list[Encoded]) -> tuple[np.ndarray, float]:
        started = self._clock()
        outputs = self._backend.forward(items)
        return outputs, self._clock() - started

    def _finish(self, batch: _Batch, done: asyncio.Future[tuple[np.ndarray, float]]) -> None:
        self._in_flight -= 1
        self._gate.release()
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
            self._items_since_idle += len(lengths)
            self._metrics.record_batch(lengths, seconds)
            self._cost.observe(len(lengths), max(lengths), seconds)
            self._sizer.after_batch(len(lengths), seconds / (max(1, max(lengths)) * len(lengths)))
            offset = 0
            for piece in batch.slices:
                count = len(piece.indices)
                if piece.pending.batch_log is not None:
                    piece.pending.batch_log.append(
                        BatchRecord.of(batch.started, self._clock(), lengths, count)
                    )
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
        pending.batches += 1
        pending.last_progress = pending.future.get_loop().time()
        if pending.completed == len(pending.items) and not pending.future.done():
            first = pending.first_batch_at if pending.first_batch_at is not None else pending.admitted_at
            pending.future.set_result(
                InferenceResult(
                    outputs=pending.outputs,
                    queue_ms=(first - pending.admitted_at) * 1000.0,
                    inference_ms=pending.inference_s * 1000.0,
                    batch_size=pending.largest_batch,
                    batches=pending.batches,
                    admitted_at=pending.admitted_at,
                    batch_log=pending.batch_log,
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
            if self._on_idle is not None and self._items_since_idle:
                self._on_idle(self._items_since_idle)
                self._items_since_idle = 0
