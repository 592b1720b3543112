"""Asynchronous jobs: embed or rerank batches too large for one HTTP request.

What every job store shares: the ``Job`` record, its statuses, the ``JobBackend`` interface
the HTTP layer calls (submit, get, cancel: all async) and ``outcome_of``, which turns what a
job's work did into its final status. Two stores implement the interface, chosen by
JOB_BACKEND: ``local`` (reranker.engine.job_local: one process, optionally durable on disk)
and ``redis`` (reranker.engine.job_redis: a shared queue for a cluster).

A job carries its validated input as a ``spec`` (plain JSON: type and fields), never as a
closure, so whichever worker runs it rebuilds the work (reranker.engine.job_work) from it.
A job is visible only to the owner that created it: a digest of the API key, or None
when the server has no keys.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from reranker.engine.controller import background_wanted
from reranker.errors import NotFoundError, NotReadyError, RerankerError

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

INTERRUPTED_BY_SHUTDOWN = {
    "type": "interrupted",
    "message": "the server shut down (restart or deploy) while the job ran; submit it again",
}


class JobCancelledError(Exception):
    """Raised inside a job's work at a slice boundary once a cancel was asked for."""


@dataclass(eq=False)
class Job:
    id: str
    type: str
    total: int
    spec: dict[str, Any] | None = None  # the validated input; dropped once finished
    owner: str | None = None  # digest of the API key that created it (never the key)
    status: JobStatus = JobStatus.QUEUED
    done: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    output: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    cancel_requested: bool = False
    # After each slice: publish progress and pick up a cancel asked elsewhere (a shared store).
    sync: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    def advance(self, items: int) -> None:
        self.done += items

    def check_cancelled(self) -> None:
        if self.cancel_requested:
            raise JobCancelledError

    def view(self) -> dict[str, Any]:
        """What GET /v1/jobs/{id} answers (no input, no owner)."""
        body: dict[str, Any] = {
            "job_id": self.id,
            "type": self.type,
            "status": self.status.value,
            "progress": {"done": self.done, "total": self.total},
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body

    def record(self) -> dict[str, Any]:
        """What a store keeps: the view and the owner's digest."""
        return {**self.view(), "owner": self.owner}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Job:
        job = cls(id=data["job_id"], type=data["type"], total=data["progress"]["total"])
        job.status = JobStatus(data["status"])
        job.done = data["progress"]["done"]
        job.created_at, job.started_at, job.finished_at = (
            data["created_at"],
            data["started_at"],
            data["finished_at"],
        )
        job.output, job.error, job.owner = data.get("output"), data.get("error"), data.get("owner")
        return job


JobRunner = Callable[[Job], Awaitable[dict[str, Any]]]


async def run_isolated(job: Job, runner: JobRunner) -> tuple[dict[str, Any] | None, BaseException | None]:
    """Run one job's work and return ``(output, None)`` or ``(None, what it raised)``.

    The work runs in a task of its own with a context of its own, so nothing it sets (the
    controller's ``background_wanted``: is this job still wanted?) outlives it or leaks into the
    next job, and whatever it raises, ``BaseException``s and a ``CancelledError`` it did not ask
    for included, is this job's failure and never ends the worker (``KeyboardInterrupt`` and
    ``SystemExit`` excepted: asyncio stops the event loop for those before anyone can catch
    them). Only the worker's own cancellation (the server stopping) propagates, after
    cancelling the work.
    """
    context = contextvars.Context()
    context.run(background_wanted.set, lambda: not job.cancel_requested)
    work = asyncio.get_running_loop().create_task(runner(job), name=f"job {job.id}", context=context)
    try:
        result: tuple[dict[str, Any] | None, BaseException | None] = (await work, None)
    except asyncio.CancelledError as exc:
        result = (None, JobCancelledError() if job.cancel_requested else exc)
    except BaseException as exc:  # noqa: BLE001 - a job's failure is its own, never the worker's
        result = (None, exc)
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:  # the worker is being stopped (even if the work
        raise asyncio.CancelledError  # swallowed the cancel it passed on): stop after the work did
    return result


def worker_failure(task: asyncio.Task[None]) -> str:
    """Why a job worker task ended (its done-callback: it never ends by itself)."""
    error = None if task.cancelled() else task.exception()
    return f"the job worker stopped: {error!r}" if error else "the job worker was cancelled"


def missing(job_id: str) -> NotFoundError:
    return NotFoundError(f"no job {job_id!r} (never submitted, or evicted after JOB_RESULT_TTL_S)")


def deleted(job_id: str) -> NotFoundError:
    return NotFoundError(f"job {job_id!r} was deleted (DELETE /v1/jobs/{job_id} after it finished)")


def outcome_of(exc: BaseException | None, draining: bool) -> tuple[JobStatus, dict[str, str] | None]:
    """The final status and error of a job whose work ended with ``exc`` (None: it completed)."""
    if exc is None:
        return JobStatus.COMPLETED, None
    if isinstance(exc, JobCancelledError):
        return JobStatus.CANCELLED, None
    if isinstance(exc, RerankerError):
        if draining and isinstance(exc, NotReadyError):
            return JobStatus.FAILED, INTERRUPTED_BY_SHUTDOWN
        return JobStatus.FAILED, {"type": exc.error_type, "message": exc.message}
    if isinstance(exc, asyncio.CancelledError):
        return JobStatus.FAILED, {"type": "internal_error", "message": "the job's work was cancelled unasked"}
    return JobStatus.FAILED, {"type": "internal_error", "message": type(exc).__name__}


class JobBackend(Protocol):
    """A job store and its worker; ``reranker.api.jobs`` calls only this."""

    draining: bool  # the server is shutting down
    failure: str | None  # set when the worker task died: jobs can no longer run here
    finished: Counter[str]  # jobs this process's worker finished, by final status

    async def start(self) -> None:
        """Open the store (StartupError when it cannot be used); no work runs yet."""

    def start_worker(self, runner: JobRunner) -> None:
        """Begin taking jobs; ``runner`` does one job's work (the model is loaded)."""

    async def close(self) -> None: ...

    async def submit(self, job_type: str, total: int, spec: dict[str, Any], owner: str | None) -> Job: ...

    async def get(self, job_id: str, owner: str | None) -> Job: ...

    async def cancel(self, job_id: str, owner: str | None, delete_finished: bool = True) -> Job:
        """Cancel a queued or running job; a finished one is deleted with its result, or with
        ``delete_finished`` False left as it is. Atomic: a job that finishes meanwhile is finished."""
        ...

    def health(self) -> dict[str, Any]:
        """``{"backend", "status": "ok" | "unavailable", ...}``; ``error`` says why it is not ok."""
        ...
