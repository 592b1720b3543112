"""Asynchronous jobs: embed or rerank batches too large for one HTTP request.

A job is queued (at most MAX_ACTIVE_JOBS queued or running, else 429), then run by one
worker task slice by slice through the same controller as interactive requests, at
background priority: the controller batches a job's items only while no request waits,
and a job has one slice queued at a time, so an interactive request waits at most for
the job batch already running. Progress moves slice by slice; cancelling stops it before
the next slice. Finished jobs are kept JOB_RESULT_TTL_S, then evicted. With a store
directory every state change is written there atomically (one JSON file a job); at
start, jobs that were queued or running when the previous process stopped come back
FAILED with that reason, and finished ones with their results.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from reranker.errors import NotFoundError, NotReadyError, RerankerError, TooManyJobsError

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
    work: Callable[[Job], Awaitable[dict[str, Any]]] | None = None  # dropped once finished
    status: JobStatus = JobStatus.QUEUED
    done: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    output: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    cancel_requested: bool = False

    def advance(self, items: int) -> None:
        self.done += items

    def check_cancelled(self) -> None:
        if self.cancel_requested:
            raise JobCancelledError

    def view(self) -> dict[str, Any]:
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

    @classmethod
    def from_view(cls, data: dict[str, Any]) -> Job:
        job = cls(id=data["job_id"], type=data["type"], total=data["progress"]["total"])
        job.status = JobStatus(data["status"])
        job.done = data["progress"]["done"]
        job.created_at, job.started_at, job.finished_at = (
            data["created_at"],
            data["started_at"],
            data["finished_at"],
        )
        job.output, job.error = data.get("output"), data.get("error")
        return job


class JobStore:
    """One ``<job id>.json`` per job, written through a temporary file and ``os.replace``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, job: Job) -> None:
        data = orjson.dumps(job.view(), option=orjson.OPT_SERIALIZE_NUMPY)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{job.id}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.directory / f"{job.id}.json")
        finally:
            Path(temporary).unlink(missing_ok=True)

    def delete(self, job_id: str) -> None:
        (self.directory / f"{job_id}.json").unlink(missing_ok=True)

    def load(self) -> list[Job]:
        """Every stored job; those a previous process left unfinished are FAILED now, with the reason."""
        jobs = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                job = Job.from_view(orjson.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable job file %s: %s", path, exc)
                continue
            if job.status not in FINISHED:
                was = job.status.value
                job.status, job.finished_at = JobStatus.FAILED, time.time()
                job.error = {
                    "type": "interrupted",
                    "message": f"the server stopped (restart or crash) while the job was {was}; "
                    "submit it again",
                }
                self.save(job)
            jobs.append(job)
        return jobs


class JobManager:
    def __init__(
        self,
        max_active: int,
        result_ttl_s: float,
        store: JobStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_active = max_active
        self._ttl_s = result_ttl_s
        self._store = store
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self.draining = False  # the server is shutting down: a job refused for it is interrupted
        self.failure: str | None = None  # set when the worker task died: jobs can no longer run

    def start(self) -> None:
        if self._store is not None:
            for job in self._store.load():
                self._jobs[job.id] = job
            log.info("job store %s: %d jobs kept", self._store.directory, len(self._jobs))
        self._worker = asyncio.get_running_loop().create_task(self._work_loop(), name="jobs")
        self._worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return
        error = None if task.cancelled() else task.exception()
        self.failure = f"the job worker stopped: {error!r}" if error else "the job worker was cancelled"
        log.error("%s; queued jobs fail", self.failure)
        for job in self._jobs.values():
            if job.status not in FINISHED:
                self._finish(job, JobStatus.FAILED, error={"type": "internal_error", "message": self.failure})

    async def close(self) -> None:
        self._closing = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for job in self._jobs.values():
            if job.status not in FINISHED:
                self._finish(job, JobStatus.FAILED, error=INTERRUPTED_BY_SHUTDOWN)

    @property
    def active(self) -> int:
        return sum(1 for job in self._jobs.values() if job.status not in FINISHED)

    async def submit(
        self, job_type: str, total: int, work: Callable[[Job], Awaitable[dict[str, Any]]]
    ) -> Job:
        if self.failure is not None:
            raise NotReadyError(f"jobs cannot run: {self.failure}", retry_after_s=30)
        self._evict_expired()
        if self.active >= self._max_active:
            raise TooManyJobsError(
                f"{self.active} jobs are queued or running (MAX_ACTIVE_JOBS={self._max_active}); retry later",
                retry_after_s=10,
            )
        job = Job(id=uuid.uuid4().hex, type=job_type, total=total, work=work)
        self._jobs[job.id] = job
        await self._save_async(job)
        self._queue.put_nowait(job)
        return job

    def get(self, job_id: str) -> Job:
        self._evict_expired()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r} (never submitted, or evicted after JOB_RESULT_TTL_S)")
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; a finished one is deleted with its result."""
        job = self.get(job_id)
        if job.status is JobStatus.QUEUED:
            self._finish(job, JobStatus.CANCELLED, persist=False)
            await self._save_async(job)
        elif job.status is JobStatus.IN_PROGRESS:
            job.cancel_requested = True  # the worker stops before the next slice
        else:
            del self._jobs[job_id]
            if self._store is not None:
                await asyncio.to_thread(self._store.delete, job_id)
        return job

    async def _work_loop(self) -> None:
        while True:
            job = await self._queue.get()
            if job.status is JobStatus.QUEUED:
                await self._run(job)

    async def _run(self, job: Job) -> None:
        assert job.work is not None
        job.status, job.started_at = JobStatus.IN_PROGRESS, self._clock()
        await self._save_async(job)
        try:
            output = await job.work(job)
        except JobCancelledError:
            self._finish(job, JobStatus.CANCELLED, persist=False)
        except RerankerError as exc:
            error = {"type": exc.error_type, "message": exc.message}
            if self.draining and isinstance(exc, NotReadyError):
                error = INTERRUPTED_BY_SHUTDOWN
            self._finish(job, JobStatus.FAILED, error=error, persist=False)
        except Exception as exc:  # a job's failure is its own, never the worker's
            log.exception("job %s failed", job.id)
            error = {"type": "internal_error", "message": type(exc).__name__}
            self._finish(job, JobStatus.FAILED, error=error, persist=False)
        else:
            self._finish(job, JobStatus.COMPLETED, output=output, persist=False)
        await self._save_async(job)

    def _finish(
        self,
        job: Job,
        status: JobStatus,
        output: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
        persist: bool = True,
    ) -> None:
        job.status, job.output, job.error = status, output, error
        job.finished_at, job.work = self._clock(), None  # the input is no longer needed
        if persist:
            self._save(job)
        log.info("job %s %s: %d/%d items", job.id, status.value, job.done, job.total)

    def _save(self, job: Job) -> None:
        """Blocking store write: only where no event loop is serving (start-up, shutdown)."""
        if self._store is not None:
            self._store.save(job)

    async def _save_async(self, job: Job) -> None:
        """Serialise and fsync the job in a worker thread, off the event loop."""
        if self._store is not None:
            await asyncio.to_thread(self._store.save, job)

    def _evict_expired(self) -> None:
        now = self._clock()
        expired = [
            job.id
            for job in self._jobs.values()
            if job.status in FINISHED and job.finished_at is not None and now - job.finished_at > self._ttl_s
        ]
        for job_id in expired:
            del self._jobs[job_id]
            if self._store is not None:
                self._store.delete(job_id)
