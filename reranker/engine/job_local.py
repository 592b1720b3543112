"""JOB_BACKEND=local: jobs of one process, queued in memory, optionally durable in JOB_STORE_DIR.

One worker task runs the jobs one at a time, slice by slice (reranker.engine.job_work).
At most MAX_ACTIVE_JOBS are queued or running (else 429). Finished jobs are kept
JOB_RESULT_TTL_S, then evicted.

With JOB_STORE_DIR every state change is written atomically: a temporary file, fsynced,
renamed over ``<id>.json``, then the directory fsynced (so the rename itself survives a
power cut). A result is its own file, ``<id>.output.json``, written the same way before the
record that says COMPLETED. The directory belongs to one process: an exclusive ``flock`` on
``.lock`` is taken at start-up, and a second process refuses to start (exit 2) instead
of failing the first one's live jobs; a cluster shares jobs through JOB_BACKEND=redis.
At start-up, jobs that were queued or running when the previous process stopped come
back FAILED with that reason; leftover ``.tmp`` files and unreadable job files are moved
to ``quarantine/`` and reported (log and /health). Results stay on disk: only the
records' small fields are read at start-up, a result is read when a client asks for it.
A store error (disk full, EIO) fails that job with the reason and never the worker; a
submission whose first write fails is refused (503) and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from cachetools import TTLCache

from reranker.engine.jobs import (
    FINISHED,
    INTERRUPTED_BY_SHUTDOWN,
    Job,
    JobRunner,
    JobStatus,
    deleted,
    missing,
    outcome_of,
    run_isolated,
    worker_failure,
)
from reranker.errors import JobStoreError, JobStoreStartupError, NotReadyError, TooManyJobsError

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"


OUTPUT_SUFFIX = ".output.json"


class JobStore:
    """One ``<job id>.json`` per job (its result in ``<job id>.output.json``) in ``directory``,
    which this process holds locked."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.quarantined: list[str] = []
        self._lock: int | None = None

    def open(self) -> None:
        """Create and lock the directory; JobStoreStartupError when another process holds it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JobStoreStartupError(f"JOB_STORE_DIR={self.directory}: cannot use it ({exc})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise JobStoreStartupError(
                f"JOB_STORE_DIR={self.directory} is in use by another reranker process; give each "
                "instance its own directory, or share jobs across instances with JOB_BACKEND=redis"
            ) from None
        self._lock = lock

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.json"

    def output_path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}{OUTPUT_SUFFIX}"

    def save(self, job: Job) -> None:
        """Write the job's result (if any), then its record, atomically and durably; OSError when
        the disk refuses."""
        record = job.record()
        output = record.pop("output", None)
        if output is not None:
            self._write(
                job.id, orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY), self.output_path(job.id)
            )
        self._write(job.id, orjson.dumps(record), self.path(job.id))

    def _write(self, job_id: str, data: bytes, target: Path) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{job_id}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
            self._sync_directory()
        finally:
            Path(temporary).unlink(missing_ok=True)

    def _sync_directory(self) -> None:
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def delete(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)
        self.output_path(job_id).unlink(missing_ok=True)

    def read_output(self, job_id: str) -> dict[str, Any] | None:
        try:
            return orjson.loads(self.output_path(job_id).read_bytes())
        except FileNotFoundError:  # written by a version that kept the result in the record
            return orjson.loads(self.path(job_id).read_bytes()).get("output")

    def load(self) -> list[Job]:
        """Every stored job without its output (read on demand); unfinished ones FAILED now."""
        self._quarantine(sorted(self.directory.glob(".*.tmp")), "left by an interrupted write")
        jobs = []
        records = [p for p in sorted(self.directory.glob("*.json")) if not p.name.endswith(OUTPUT_SUFFIX)]
        for path in records:
            try:
                job = Job.from_record(orjson.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._quarantine([path], f"unreadable ({exc})")
                continue
            job.output = None  # stays on disk until a client asks
            if job.status not in FINISHED:
                was = job.status.value
                job.status, job.finished_at = JobStatus.FAILED, time.time()
                job.error = {
                    "type": "interrupted",
                    "message": f"the server stopped (restart or crash) while the job was {was}; "
                    "submit it again",
                }
                self.save(job)
            if job.status is not JobStatus.COMPLETED:  # a result written just before a crash
                self.output_path(job.id).unlink(missing_ok=True)
            jobs.append(job)
        known = {job.id for job in jobs}
        orphans = [
            p
            for p in sorted(self.directory.glob(f"*{OUTPUT_SUFFIX}"))
            if p.name[: -len(OUTPUT_SUFFIX)] not in known
        ]
        self._quarantine(orphans, "a result without its job record")
        return jobs

    def _quarantine(self, paths: list[Path], why: str) -> None:
        if not paths:
            return
        target = self.directory / QUARANTINE
        target.mkdir(exist_ok=True)
        for path in paths:
            kept = target / path.name
            if kept.exists():  # an earlier start quarantined one of this name: keep both
                kept = target / f"{path.name}.{time.time_ns()}"
            os.replace(path, kept)
            self.quarantined.append(path.name)
            log.warning("job store: moved %s to %s: %s", path.name, target, why)
        self._sync_directory()


class LocalJobs:
    """The jobs of this process (the ``JobBackend`` for JOB_BACKEND=local)."""

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
        self.finished: Counter[str] = Counter()  # jobs this process finished, by final status (/metrics)
        # Deleted jobs' ids (and owners) for JOB_RESULT_TTL_S: reading one says it was deleted.
        self._deleted: TTLCache[str, str | None] = TTLCache(maxsize=100_000, ttl=max(result_ttl_s, 1.0))
        self._on_disk: set[str] = set()  # finished jobs whose output is only in the store
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self.draining = False
        self.failure: str | None = None

    async def start(self) -> None:
        if self._store is None:
            return
        self._store.open()
        try:
            kept = await asyncio.to_thread(self._store.load)
        except OSError as exc:  # a read-only or full disk: say so and stop, as for a locked directory
            raise JobStoreStartupError(
                f"JOB_STORE_DIR={self._store.directory}: cannot recover its jobs ({exc})"
            ) from None
        for job in kept:
            self._jobs[job.id] = job
            if job.status is JobStatus.COMPLETED:
                self._on_disk.add(job.id)
        moved = len(self._store.quarantined)
        log.info(
            "job store %s: %d jobs kept, %d files quarantined", self._store.directory, len(self._jobs), moved
        )

    def start_worker(self, runner: JobRunner) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work_loop(runner), name="jobs")
        self._worker.add_done_callback(self._worker_ended)

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"backend": "local", "status": "ok", "active": self.active}
        if self._store is not None:
            body["store_dir"] = str(self._store.directory)
            body["quarantined"] = list(self._store.quarantined)
        return body

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return
        self.failure = worker_failure(task)
        log.error("%s; queued jobs fail", self.failure)
        for job in self._jobs.values():
            if job.status not in FINISHED:
                self._finish(job, JobStatus.FAILED, error={"type": "internal_error", "message": self.failure})
                self._save_quietly(job)

    async def close(self) -> None:
        self._closing = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for job in self._jobs.values():
            if job.status not in FINISHED:
                self._finish(job, JobStatus.FAILED, error=INTERRUPTED_BY_SHUTDOWN)
                self._save_quietly(job)
        if self._store is not None:
            self._store.close()

    @property
    def active(self) -> int:
        return sum(1 for job in self._jobs.values() if job.status not in FINISHED)

    async def submit(self, job_type: str, total: int, spec: dict[str, Any], owner: str | None) -> Job:
        if self.failure is not None:
            raise NotReadyError(f"jobs cannot run: {self.failure}", retry_after_s=30)
        self._evict_expired()
        if self.active >= self._max_active:
            raise TooManyJobsError(
                f"{self.active} jobs are queued or running (MAX_ACTIVE_JOBS={self._max_active}); retry later",
                retry_after_s=10,
            )
        job = Job(id=uuid.uuid4().hex, type=job_type, total=total, spec=spec, owner=owner)
        self._jobs[job.id] = job  # counted at once: concurrent submissions see it
        try:
            await self._save_async(job)
        except OSError as exc:
            del self._jobs[job.id]
            raise JobStoreError(
                f"the job could not be stored in JOB_STORE_DIR ({exc.strerror or exc}); it was not accepted",
                retry_after_s=30,
            ) from None
        self._queue.put_nowait(job)
        return job

    async def get(self, job_id: str, owner: str | None) -> Job:
        self._evict_expired()
        job = self._jobs.get(job_id)
        if job is None and job_id in self._deleted and self._deleted[job_id] == owner:
            raise deleted(job_id)
        if job is None or job.owner != owner:
            raise missing(job_id)
        if job_id in self._on_disk and self._store is not None:
            try:
                output = await asyncio.to_thread(self._store.read_output, job_id)
            except (OSError, ValueError) as exc:
                error = {"type": "job_store_error", "message": f"the result could not be read back: {exc}"}
                return dataclasses.replace(job, status=JobStatus.FAILED, error=error)
            return dataclasses.replace(job, output=output)  # a copy: the result is not kept in memory
        return job

    async def cancel(self, job_id: str, owner: str | None, delete_finished: bool = True) -> Job:
        """Cancel a queued or running job; a finished one is deleted with its result (unless
        ``delete_finished`` is False)."""
        job = await self.get(job_id, owner)
        if job.status is JobStatus.QUEUED:
            job.cancel_requested = True  # the worker skips it from now on
            await self._conclude(job, JobStatus.CANCELLED)
        elif job.status is JobStatus.IN_PROGRESS:
            job.cancel_requested = True  # the worker stops before the next slice
        elif delete_finished:
            self._jobs.pop(job_id, None)
            self._deleted[job_id] = owner
            self._on_disk.discard(job_id)
            if self._store is not None:
                await asyncio.to_thread(self._store.delete, job_id)
        return job

    async def _work_loop(self, runner: JobRunner) -> None:
        while True:
            job = await self._queue.get()
            if job.status is not JobStatus.QUEUED or job.cancel_requested:
                continue
            try:
                await self._run(job, runner)
            except Exception as exc:  # a bookkeeping surprise (say, an output the store cannot write)
                log.exception("job %s: the worker could not record it", job.id)
                if job.status not in FINISHED:
                    message = f"the job could not be recorded ({type(exc).__name__})"
                    self._finish(job, JobStatus.FAILED, error={"type": "internal_error", "message": message})
                    self._save_quietly(job)

    async def _run(self, job: Job, runner: JobRunner) -> None:
        job.status, job.started_at = JobStatus.IN_PROGRESS, self._clock()
        if not await self._save_or_fail(job):
            return
        output, failure = await run_isolated(job, runner)
        status, error = outcome_of(failure, self.draining)
        if error is not None and error["type"] == "internal_error":
            log.error("job %s failed", job.id, exc_info=failure)
        saved = await self._conclude(job, status, output, error)
        if self._jobs.get(job.id) is not job:  # deleted while its result was being written
            if self._store is not None:
                await asyncio.to_thread(self._store.delete, job.id)
        elif saved and self._store is not None and status is JobStatus.COMPLETED:
            job.output = None  # on disk now; read back when asked for
            self._on_disk.add(job.id)

    async def _conclude(
        self,
        job: Job,
        status: JobStatus,
        output: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> bool:
        """Store the job's final state, then show it (so a client never sees a status that a
        refused write turns into FAILED); False when the store refused (the job is FAILED)."""
        final = dataclasses.replace(job, status=status, output=output, error=error, finished_at=self._clock())
        saved = await self._save_or_fail(final)
        shown = output if saved else None
        self._finish(job, final.status, output=shown, error=final.error, finished_at=final.finished_at)
        return saved

    async def _save_or_fail(self, job: Job) -> bool:
        """Persist the job; when the store refuses, the job fails with the reason (and True/False)."""
        try:
            await self._save_async(job)
            return True
        except OSError as exc:
            log.error("job %s: the store refused a write: %s", job.id, exc)
            reason = f"the job could not be written to JOB_STORE_DIR ({exc.strerror or exc})"
            self._finish(job, JobStatus.FAILED, error={"type": "job_store_error", "message": reason})
            self._save_quietly(job)
            return False

    def _save_quietly(self, job: Job) -> None:
        try:
            self._save(job)
        except OSError as exc:
            log.error("job %s: could not record its final state: %s", job.id, exc)

    def _finish(
        self,
        job: Job,
        status: JobStatus,
        output: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
        finished_at: float | None = None,
    ) -> None:
        job.status, job.output, job.error = status, output, error
        job.finished_at = self._clock() if finished_at is None else finished_at
        job.spec = None  # the input is no longer needed
        self.finished[status.value] += 1
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
            self._on_disk.discard(job_id)
            if self._store is not None:
                try:
                    self._store.delete(job_id)
                except OSError as exc:
                    log.warning("job store: could not delete evicted job %s: %s", job_id, exc)
