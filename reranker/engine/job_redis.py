"""JOB_BACKEND=redis: one job queue shared by every instance, in Redis (REDIS_URL).

Any instance accepts a submission, a worker on every instance takes work from the shared
queue, any instance answers status, result and cancel; finished jobs expire after
JOB_RESULT_TTL_S. Execution is at least once, the result exactly once.

Why Redis Streams consumer groups, used directly through ``redis.asyncio``, and not a
task-queue library (arq, saq, rq, taskiq): the worker here is not a separate process
that imports a function by name; it is a task inside the server that must run the job
slice by slice through this process's model controller at background priority, report
progress, stop at a slice boundary on cancel, and hand its job back on a graceful
shutdown. rq forks a synchronous worker per job (the model would load per job); arq and
taskiq retry a job whose worker vanished only after a whole-job timeout (no heartbeat),
and their results, progress and abort are their own records, beside ours; saq comes
closest (heartbeats, sweeps, abort) but owns the job record and its status model, which
would then have to be mapped to ours and to RunPod's. Streams consumer groups are Redis's
own, documented queue semantics for exactly this: XADD enqueues, XREADGROUP delivers an
entry to one consumer and keeps it in the group's pending list until XACK, XAUTOCLAIM
hands entries idle longer than a lease to another consumer, and each entry's delivery
count is kept by Redis. Nothing about leases is invented here; we only decide the lease
length and the heartbeat, and keep our job record (a hash) beside the entry.

- Submit (one Lua script, atomic): refuse when MAX_ACTIVE_JOBS jobs are active in the
  cluster; else write the job hash (status, owner digest, the validated input as JSON),
  add it to the active set and XADD its id to the stream.
- Work: every instance's worker first XAUTOCLAIMs one entry idle longer than JOB_LEASE_S
  (a dead or stalled worker's), else XREADGROUPs a new one. While it runs, a heartbeat
  every min(1 s, lease/3) re-XCLAIMs the entry (resetting its idle time) if this worker
  still holds it, writes progress and reads the cancel flag. A worker that lost its
  lease (it stalled longer than the lease and another took the job) drops its run.
- Finish: the output is written first, in parts of 64 MiB under keys of this run's own
  (a Redis string holds at most 512 MB); then one Lua script records them, or the error, only
  if the job is not finished yet (so two runs of one job give one result; a losing run's
  parts are deleted), drops the input, sets the TTL, and XACKs and
  XDELs the entry. An entry delivered more than JOB_MAX_ATTEMPTS times fails its job
  (a poison job that kills every worker that takes it).
- Cancel: a queued job is finished CANCELLED at once; a running one gets a flag the
  heartbeat reads, and stops before its next slice; a finished one is deleted.
- Redis lost while serving: submissions and reads answer 503 naming the URL, /health says
  ``degraded`` with the reason, the worker retries and recovers when Redis returns.
- Graceful shutdown: a running job is handed back (its entry's idle time set past the
  lease) so another instance takes it at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from reranker.engine.job_redis_scripts import BEAT, BEGIN, CANCEL, FINISH, RELEASE, SUBMIT
from reranker.engine.jobs import (
    FINISHED,
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
from reranker.settings import Settings

log = logging.getLogger(__name__)

GROUP = "workers"
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
RETRY_PAUSE_S = 0.5  # between attempts to reach a lost Redis
BIG_JSON_BYTES = 256 * 1024  # parsed off the event loop above this
FIELDS = ("type", "total", "status", "done", "created_at", "started_at", "finished_at")
FIELDS += ("owner", "output_parts", "error")
# A job's output is kept in parts beside its record: one Redis string holds at most 512 MB, and an
# embed job of 200,000 chunks answers more JSON than that; parts also keep each command small.
OUTPUT_PART_BYTES = 64 * 1024 * 1024


def redacted(url: str) -> str:
    """REDIS_URL without its password, for messages and /health."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _float(raw: bytes | None) -> float | None:
    return float(raw) if raw else None


async def _loads(raw: bytes) -> Any:
    """Parse JSON; a big document (a job's input or output) in a worker thread."""
    return await asyncio.to_thread(orjson.loads, raw) if len(raw) > BIG_JSON_BYTES else orjson.loads(raw)


class RedisJobs:
    """The cluster's jobs in Redis (the ``JobBackend`` for JOB_BACKEND=redis)."""

    def __init__(self, settings: Settings) -> None:
        self._url = redacted(settings.redis_url)
        self._redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=30,
            retry=Retry(ConstantBackoff(0.05), 1),  # one reconnect after Redis restarts; then fail fast
        )
        prefix = settings.redis_job_queue
        self._stream, self._active = f"{prefix}:stream", f"{prefix}:active"
        self._job_prefix = f"{prefix}:job:"
        self._max_active = settings.max_active_jobs
        self.finished: Counter[str] = Counter()  # jobs this worker finished, by final status (/metrics)
        self._ttl_s = max(1, round(settings.job_result_ttl_s))
        self._lease_ms = round(settings.job_lease_s * 1000)
        self._tick_s = min(1.0, settings.job_lease_s / 3)
        self._max_attempts = settings.job_max_attempts
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in {
                "submit": SUBMIT,
                "begin": BEGIN,
                "finish": FINISH,
                "beat": BEAT,
                "release": RELEASE,
                "cancel": CANCEL,
            }.items()
        }
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._problem: str | None = None
        self.draining = False
        self.failure: str | None = None

    def _key(self, job_id: str) -> str:
        return self._job_prefix + job_id

    @contextmanager
    def _answered(self, what: str) -> Iterator[None]:
        """Redis failures of a client's call as the 503 it is answered with (never a 500)."""
        try:
            yield
        except UNREACHABLE as exc:
            raise self._unreachable(exc) from None
        except RedisError as exc:
            raise JobStoreError(
                f"JOB_BACKEND=redis: Redis refused the {what} ({exc})", retry_after_s=5
            ) from None

    def _unreachable(self, exc: BaseException) -> JobStoreError:
        self._problem = f"JOB_BACKEND=redis: Redis at {self._url} is unreachable ({exc})"
        return JobStoreError(f"{self._problem}; jobs are refused until it is back", retry_after_s=5)

    async def start(self) -> None:
        try:
            await self._redis.ping()
            await self._ensure_group()
        except (*UNREACHABLE, RedisError) as exc:
            raise JobStoreStartupError(
                f"JOB_BACKEND=redis: cannot reach Redis at REDIS_URL={self._url} ({exc})"
            ) from None
        log.info("jobs: Redis queue %s at %s, worker %s", self._stream, self._url, self._consumer)

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def start_worker(self, runner: JobRunner) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work_loop(runner), name="jobs")
        self._worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return
        self.failure = worker_failure(task)
        log.error("%s; other instances take its jobs after JOB_LEASE_S", self.failure)

    async def close(self) -> None:
        self._closing = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        await self._leave_group()
        await self._redis.aclose()

    async def _leave_group(self) -> None:
        """Remove this process's consumer (one per start) unless it still holds an entry: a
        handed-back job stays pending under it until another worker claims it."""
        try:
            held = await self._redis.xpending_range(
                self._stream, GROUP, "-", "+", 1, consumername=self._consumer
            )
            if not held:
                await self._redis.xgroup_delconsumer(self._stream, GROUP, self._consumer)
        except (*UNREACHABLE, RedisError) as exc:
            log.info("jobs: consumer %s left in the group (%s)", self._consumer, exc)

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "backend": "redis",
            "status": "ok" if self._problem is None else "unavailable",
            "redis_url": self._url,
            "queue": self._stream,
            "lease_s": self._lease_ms / 1000,
            "worker": self._consumer,
        }
        if self._problem is not None:
            body["error"] = self._problem
        return body

    async def submit(self, job_type: str, total: int, spec: dict[str, Any], owner: str | None) -> Job:
        if self.failure is not None:
            raise NotReadyError(f"jobs cannot run here: {self.failure}", retry_after_s=30)
        job = Job(id=uuid.uuid4().hex, type=job_type, total=total, owner=owner)
        record = {
            "type": job_type,
            "total": total,
            "status": JobStatus.QUEUED.value,
            "done": 0,
            "created_at": repr(job.created_at),
            "started_at": "",
            "finished_at": "",
            "owner": owner or "",
            "spec": await asyncio.to_thread(orjson.dumps, spec),  # big inputs: off the event loop
        }
        args: list[Any] = [self._max_active, job.id]
        for name, value in record.items():
            args += [name, value]
        with self._answered("submission"):
            keys = [self._key(job.id), self._active, self._stream]
            active = await self._scripts["submit"](keys=keys, args=args)
        self._problem = None
        if active >= 0:
            raise TooManyJobsError(
                f"{active} jobs are queued or running in the cluster (MAX_ACTIVE_JOBS={self._max_active}); "
                "retry later",
                retry_after_s=10,
            )
        return job

    async def get(self, job_id: str, owner: str | None) -> Job:
        with self._answered("read"):
            values = await self._redis.hmget(self._key(job_id), FIELDS)
        fields = dict(zip(FIELDS, values, strict=True))
        if fields["status"] is None:
            with self._answered("read"):
                tombstone = await self._redis.get(self._key(job_id) + ":deleted")
            if tombstone is not None and tombstone.decode() == (owner or ""):
                raise deleted(job_id)
        if fields["status"] is None or (fields["owner"] or b"").decode() != (owner or ""):
            raise missing(job_id)
        job = Job(id=job_id, type=fields["type"].decode(), total=int(fields["total"]), owner=owner)
        job.status, job.done = JobStatus(fields["status"].decode()), int(fields["done"] or 0)
        job.created_at = float(fields["created_at"])
        job.started_at, job.finished_at = _float(fields["started_at"]), _float(fields["finished_at"])
        job.output = await self._output(fields["output_parts"])
        job.error = orjson.loads(fields["error"]) if fields["error"] else None
        return job

    def _part_keys(self, reference: bytes | str) -> list[str]:
        """The keys of an output recorded as ``<job key>:out:<run>:<parts>``."""
        prefix, _, count = (reference.decode() if isinstance(reference, bytes) else reference).rpartition(":")
        return [f"{prefix}:{index}" for index in range(int(count))]

    async def _output(self, reference: bytes | None) -> dict[str, Any] | None:
        if not reference:
            return None
        with self._answered("read"):
            parts = await self._redis.mget(self._part_keys(reference))
        if any(part is None for part in parts):  # expired a moment before its record
            raise JobStoreError("the job's output expired (JOB_RESULT_TTL_S) while it was read")
        return await _loads(b"".join(parts))

    async def _write_output(self, job_id: str, output: dict[str, Any]) -> str:
        """Store ``output`` in parts under keys of this run's own; the reference to record."""
        result = await asyncio.to_thread(orjson.dumps, output, option=orjson.OPT_SERIALIZE_NUMPY)
        step = OUTPUT_PART_BYTES
        reference = f"{self._key(job_id)}:out:{uuid.uuid4().hex[:12]}:{max(1, -(-len(result) // step))}"
        async with self._redis.pipeline(transaction=False) as pipe:
            for index, key in enumerate(self._part_keys(reference)):
                pipe.set(key, result[index * step : (index + 1) * step], ex=self._ttl_s)
            await pipe.execute()
        return reference

    async def cancel(self, job_id: str, owner: str | None, delete_finished: bool = True) -> Job:
        """Cancel a queued or running job; delete a finished one. The answer is the job as the
        cancel found it, which may be finished (and so deleted) since ``get`` read it."""
        job = await self.get(job_id, owner)
        with self._answered("cancel"):
            now = time.time()
            args = [job_id, owner or "", repr(now), self._ttl_s, int(delete_finished)]
            keys = [self._key(job_id), self._active]
            outcome, *found = [part.decode() for part in await self._scripts["cancel"](keys=keys, args=args)]
            if outcome == "deleted" and found[2]:  # a finished job deleted: its output parts go with it
                await self._redis.delete(*self._part_keys(found[2]))
            if outcome == "deleted":  # reading it later says so, for as long as its result would have lived
                await self._redis.set(self._key(job_id) + ":deleted", owner or "", ex=self._ttl_s)
        if outcome == "missing":
            raise missing(job_id)
        if outcome == "cancelled":
            job.status, job.finished_at = JobStatus.CANCELLED, now
        elif outcome == "finished" and job.status.value != found[0]:  # it finished since get read it
            job = await self.get(job_id, owner)
        elif outcome == "deleted" and job.status.value != found[0]:
            job.status, job.finished_at, job.output = JobStatus(found[0]), float(found[1] or now), None
            job.done = job.total if job.status is JobStatus.COMPLETED else job.done
        return job

    async def _work_loop(self, runner: JobRunner) -> None:
        claim_from = "0-0"
        while True:
            try:
                if self.draining:
                    await asyncio.sleep(self._tick_s)  # take nothing new; the server stops soon
                    continue
                claim_from, entry = await self._next_entry(claim_from)
                self._problem = None
                if entry is not None:
                    await self._take(*entry, runner)
            except UNREACHABLE as exc:
                if self._problem is None:
                    log.error("jobs: Redis at %s is unreachable: %s", self._url, exc)
                self._unreachable(exc)
                await asyncio.sleep(RETRY_PAUSE_S)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("jobs: queue %s gone (Redis restarted empty?): made again", self._stream)
                    await self._ensure_group()
                else:  # a refused command: say it, and go on with the next job
                    log.error("jobs: Redis refused a command: %s", exc)
                    await asyncio.sleep(RETRY_PAUSE_S)
            except Exception:  # one entry's surprise (a damaged record) never ends the worker
                log.exception("jobs: taking the next job failed; its entry stays pending (JOB_LEASE_S)")
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _next_entry(self, claim_from: str) -> tuple[str, tuple[str, str, int] | None]:
        """(next XAUTOCLAIM cursor, (entry id, job id, delivery count) or None)."""
        redis = self._redis
        cursor, claimed, _ = await redis.xautoclaim(
            self._stream, GROUP, self._consumer, min_idle_time=self._lease_ms, start_id=claim_from, count=1
        )
        entries = claimed
        if not entries:
            block_ms = max(50, min(1000, self._lease_ms // 2))
            delivered = await redis.xreadgroup(
                GROUP, self._consumer, {self._stream: ">"}, count=1, block=block_ms
            )
            entries = delivered[0][1] if delivered else []
        if not entries:
            return cursor.decode(), None
        entry_id, fields = entries[0]
        pending = await redis.xpending_range(self._stream, GROUP, entry_id, entry_id, 1)
        deliveries = pending[0]["times_delivered"] if pending else 1
        return cursor.decode(), (entry_id.decode(), fields[b"job"].decode(), deliveries)

    async def _take(self, entry_id: str, job_id: str, deliveries: int, runner: JobRunner) -> None:
        if deliveries > self._max_attempts:
            log.error("job %s: delivered %d times, failed as poison", job_id, deliveries)
            error = {
                "type": "job_failed_repeatedly",
                "message": f"the job was started {deliveries - 1} times and its worker died or stalled "
                f"each time (JOB_MAX_ATTEMPTS={self._max_attempts})",
            }
            await self._finish(job_id, entry_id, JobStatus.FAILED, None, error)
            return
        key = self._key(job_id)
        args = [self._consumer, repr(time.time()), deliveries]
        begun = await self._scripts["begin"](keys=[key], args=args)  # [run, type, total, spec] or a word
        if begun == b"cancel":
            await self._finish(job_id, entry_id, JobStatus.CANCELLED, None, None)
            return
        if not isinstance(begun, list):  # expired, deleted or already finished: only the entry is left
            await self._retire(entry_id)
            return
        _, type_, total, spec = begun
        job = Job(id=job_id, type=type_.decode(), total=int(total), spec=await _loads(spec))
        job.status = JobStatus.IN_PROGRESS
        if deliveries > 1:
            log.info("job %s: taken over (delivery %d)", job_id, deliveries)
        lease_lost = asyncio.Event()
        job.sync = lambda: self._beat(job, entry_id, lease_lost)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(job, entry_id, lease_lost))
        try:
            output, failure = await run_isolated(job, runner)
        except asyncio.CancelledError:  # the worker is stopping (run_isolated lets only that through)
            heartbeat.cancel()  # a beat after the hand-back would take the entry back for a lease
            await asyncio.gather(heartbeat, return_exceptions=True)
            await asyncio.shield(self._release(job_id, entry_id))  # shutting down: another instance runs it
            raise
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        if lease_lost.is_set():
            log.warning("job %s: another worker took it over (this one stalled past JOB_LEASE_S)", job_id)
            return
        if self.draining and isinstance(failure, NotReadyError):
            await self._release(job_id, entry_id)
            return
        status, error = outcome_of(failure, self.draining)
        if error is not None and error["type"] == "internal_error":
            log.error("job %s failed", job_id, exc_info=failure)
        job.done = job.done if status is not JobStatus.COMPLETED else job.total
        await self._finish(job_id, entry_id, status, output, error)
        log.info("job %s %s: %d/%d items", job_id, status.value, job.done, job.total)

    async def _heartbeat(self, job: Job, entry_id: str, lease_lost: asyncio.Event) -> None:
        """Every tick while the job runs (a slice may take longer than the lease)."""
        while not lease_lost.is_set():
            await asyncio.sleep(self._tick_s)
            await self._beat(job, entry_id, lease_lost)

    async def _beat(self, job: Job, entry_id: str, lease_lost: asyncio.Event) -> None:
        """Keep the lease, publish progress, pick up a cancel (also after every slice)."""
        try:
            args = [GROUP, entry_id, self._consumer, job.done]
            held, cancel = await self._scripts["beat"](keys=[self._stream, self._key(job.id)], args=args)
        except UNREACHABLE as exc:
            self._unreachable(exc)
            return  # the job goes on; its lease may pass to another worker meanwhile
        except RedisError as exc:  # OOM, BUSY, NOGROUP: the next beat tries again
            log.warning("jobs: heartbeat of job %s refused by Redis: %s", job.id, exc)
            return
        except Exception:  # a surprise in one beat: the next beat tries again
            log.exception("jobs: heartbeat of job %s failed", job.id)
            return
        if not held:
            lease_lost.set()
            job.cancel_requested = True  # stop at the next slice; the other worker delivers
        elif cancel:
            job.cancel_requested = True

    async def _finish(
        self,
        job_id: str,
        entry_id: str,
        status: JobStatus,
        output: dict[str, Any] | None,
        error: dict[str, str] | None,
    ) -> bool:
        """Record the job's one result (False: it had one already) and retire its queue entry."""
        assert status in FINISHED
        reference = "" if output is None else await self._write_output(job_id, output)
        args = [
            job_id,
            status.value,
            repr(time.time()),
            reference,
            orjson.dumps(error) if error is not None else "",
            self._ttl_s,
            GROUP,
            entry_id,
        ]
        keys = [self._key(job_id), self._active, self._stream]
        recorded = bool(await self._scripts["finish"](keys=keys, args=args))
        if recorded:
            self.finished[status.value] += 1
        if reference and not recorded:  # another run's result is the job's: drop this one's
            await self._redis.delete(*self._part_keys(reference))
        return recorded

    async def _retire(self, entry_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.xack(self._stream, GROUP, entry_id).xdel(self._stream, entry_id).execute()

    async def _release(self, job_id: str, entry_id: str) -> None:
        try:
            args = [GROUP, entry_id, self._consumer, self._lease_ms + 1000]
            if await self._scripts["release"](keys=[self._stream, self._key(job_id)], args=args):
                log.info("job %s handed back to the queue (shutting down)", job_id)
        except UNREACHABLE as exc:
            log.warning("job %s: could not hand it back (%s); it moves on after JOB_LEASE_S", job_id, exc)
