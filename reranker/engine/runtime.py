"""The server's moving parts and their life cycle: load, serve, drain, stop.

Loading runs in the background so /livez answers and /health says ``loading``
while a big model loads; a load failure marks the runtime unhealthy and calls
``on_fatal`` (the CLI uses it to exit non-zero).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from reranker.backends.base import Backend, Encoded, ModelInfo, ModelKind
from reranker.engine import resources
from reranker.engine.adaptive import BatchSizer
from reranker.engine.cache import DISABLED_STATS, PredictionCache
from reranker.engine.controller import InferenceController
from reranker.engine.job_local import JobStore, LocalJobs
from reranker.engine.job_work import work_from_spec
from reranker.engine.jobs import Job, JobBackend
from reranker.engine.metrics import Metrics
from reranker.engine.service import InferenceService
from reranker.errors import JobStoreStartupError, NotReadyError
from reranker.settings import Settings

log = logging.getLogger(__name__)

BackendFactory = Callable[[Settings], Backend]
RELEASE_MEMORY_AFTER_ITEMS = 256  # idle after this much work: trim the allocator's arenas


class Status(StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


def default_backend_factory(settings: Settings) -> Backend:
    from reranker.backends.factory import create_backend

    return create_backend(settings)


def batch_size_for(settings: Settings, backend: Backend) -> int:
    """BATCH_SIZE when it is set; else the backend's preference on its device (a GPU takes
    larger batches: MAX_BATCH_TOKENS still caps them), else BATCH_SIZE's default."""
    if "batch_size" in settings.model_fields_set or backend.preferred_batch_size is None:
        return settings.batch_size
    return backend.preferred_batch_size


def calibration_batches(backend: Backend, batch_size: int) -> list[list[Encoded]]:
    """Batches of a few sizes and lengths (cheap: at most 8 x 128 tokens) to time at start-up."""
    info = backend.info()
    words = " ".join(f"calibration{i % 50}" for i in range(400))
    if info.kind is ModelKind.BI_ENCODER:
        (longest,) = backend.tokenize_texts([words])
    else:
        (longest,) = backend.tokenize_pairs([("calibration query", words)])
    batches = []
    for length in sorted({min(n, len(longest)) for n in (16, 64, 128)}):
        item = Encoded(ids=longest.ids[:length], type_ids=longest.type_ids[:length])
        batches.extend([[item] * size for size in sorted({1, min(8, batch_size)})])
    return batches


def job_backend(settings: Settings) -> JobBackend:
    """The job store JOB_BACKEND names: this process's (local) or the cluster's (redis)."""
    if settings.job_backend == "redis":
        from reranker.engine.job_redis import RedisJobs

        return RedisJobs(settings)
    store = JobStore(Path(settings.job_store_dir)) if settings.job_store_dir else None
    return LocalJobs(settings.max_active_jobs, settings.job_result_ttl_s, store)


def prediction_cache(settings: Settings, info: ModelInfo) -> PredictionCache | None:
    if not settings.enable_prediction_cache:
        return None
    model = f"{info.name}|{info.backend}|{info.dtype}|{info.max_length}"
    return PredictionCache(model, settings.prediction_cache_size, settings.prediction_cache_ttl_s)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        backend: Backend | None = None,
        backend_factory: BackendFactory = default_backend_factory,
    ) -> None:
        self.settings = settings
        self.batch_size = settings.batch_size  # until the backend is loaded: batch_size_for
        self.metrics = Metrics()
        self._status = Status.LOADING
        self._error: str | None = None
        self.backend = backend
        self._info: tuple[Backend, ModelInfo] | None = None
        self.controller: InferenceController | None = None
        self.service: InferenceService | None = None
        self.cache: PredictionCache | None = None
        self._factory = backend_factory
        self._loader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.resources = resources.detect(settings.max_parallel_requests, settings.inference_threads)
        self.jobs = job_backend(settings)
        self._trims: set[asyncio.Future[bool]] = set()  # allocator trims running in the executor

    @property
    def status(self) -> Status:
        """UNHEALTHY as soon as a supervised task (batcher, job worker) has died."""
        return Status.UNHEALTHY if self.task_failure() else self._status

    @status.setter
    def status(self, value: Status) -> None:
        self._status = value

    @property
    def error(self) -> str | None:
        return self.task_failure() or self._error

    @error.setter
    def error(self, value: str | None) -> None:
        self._error = value

    def task_failure(self) -> str | None:
        """Why a task the server cannot work without stopped, or None while all run."""
        if self.controller is not None and self.controller.failure:
            return self.controller.failure
        return self.jobs.failure

    async def start(self, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        try:
            await self.jobs.start()
        except JobStoreStartupError as exc:  # serving without the job store would lose jobs
            self.status, self.error = Status.UNHEALTHY, exc.message
            log.error("%s", exc.message)
            self.ready.set()
            if on_fatal is not None:
                on_fatal(exc)
            return
        self._loader = asyncio.get_running_loop().create_task(self._load(on_fatal), name="model-loader")

    async def _load(self, on_fatal: Callable[[BaseException], None] | None) -> None:
        try:
            settings = self.settings
            loaded_here = self.backend is None
            if loaded_here:
                from reranker.backends import threads

                await asyncio.to_thread(threads.configure, self.resources.threads_per_batch)
            backend = self.backend or await asyncio.to_thread(self._factory, self.settings)
            await asyncio.to_thread(backend.warmup)
            batch_size = self.batch_size = batch_size_for(settings, backend)
            sizer = BatchSizer(
                initial=batch_size,
                maximum=max(settings.embedding_max_batch_size, batch_size),
                adaptive=settings.embedding_adaptive_batching,
                memory_limit_bytes=int(
                    self.resources.memory_bytes * settings.embedding_max_memory_percent / 100
                ),
            )
            controller = InferenceController(
                backend,
                batch_size=batch_size,
                max_parallel=self.settings.max_parallel_requests,
                max_queue=self.settings.max_queue_size,
                metrics=self.metrics,
                max_batch_tokens=self.settings.max_batch_tokens,
                batch_wait_s=self.settings.batch_wait_ms / 1000.0,
                group_by_length=settings.batch_length_grouping,
                sizer=sizer,
                max_request_s=settings.max_request_seconds or None,
                on_idle=self._after_burst,
            )
            if loaded_here:  # an injected backend (tests) starts with an unmeasured cost model
                await asyncio.to_thread(controller.calibrate, calibration_batches(backend, batch_size))
            controller.start()
            self.backend, self.controller = backend, controller
            info = backend.info()
            self.cache = prediction_cache(settings, info)
            self.service = InferenceService(
                backend, controller, settings.request_timeout_s, self.cache, settings.default_prompt_name
            )
            self.status = Status.HEALTHY
            self.jobs.start_worker(self._run_job)
            log.info("ready: %s (%s) on %s/%s", info.name, info.kind.value, info.backend, info.device)
        except Exception as exc:  # noqa: BLE001 - any load failure makes the server unhealthy
            self.status = Status.UNHEALTHY
            self.error = str(exc) or type(exc).__name__
            log.error("model failed to load: %s", self.error)
            if on_fatal is not None:
                on_fatal(exc)
        finally:
            self.ready.set()

    async def _run_job(self, job: Job) -> dict[str, Any]:
        """One job's work, rebuilt from its validated input, through this process's model."""
        assert job.spec is not None
        return await work_from_spec(job.spec)(job, self.require_service())

    def _after_burst(self, items: int) -> None:
        """The model went idle after ``items`` items: after big work, give freed memory back."""
        if items >= RELEASE_MEMORY_AFTER_ITEMS:
            self.metrics.memory_trims += 1
            trim = asyncio.get_running_loop().run_in_executor(None, resources.trim_allocator)
            self._trims.add(trim)  # held until done, and its failure logged (not dropped)
            trim.add_done_callback(self._trim_done)

    def _trim_done(self, trim: asyncio.Future[bool]) -> None:
        self._trims.discard(trim)
        if not trim.cancelled() and trim.exception() is not None:
            log.warning("giving freed memory back failed: %r", trim.exception())

    def begin_drain(self) -> int:
        """Refuse new work from now on; returns how many admitted requests are unfinished."""
        if self.status is Status.HEALTHY:
            self.status = Status.DRAINING
        self.jobs.draining = True
        if self.controller is None:
            return 0
        self.controller.stop_admitting()
        return self.controller.queued + self.controller.in_flight

    async def wait_idle(self) -> None:
        if self.controller is not None:
            await self.controller.wait_idle()

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        await self.jobs.close()
        if self.controller is not None:
            await self.controller.close()

    def require_service(self) -> InferenceService:
        if self.status is Status.HEALTHY and self.service is not None:
            return self.service
        if self.status is Status.LOADING:
            raise NotReadyError("the model is still loading", retry_after_s=5)
        if self.status is Status.DRAINING:
            raise NotReadyError("the server is draining for shutdown", retry_after_s=1)
        raise NotReadyError(f"the model is not available: {self.error}", retry_after_s=30)

    def model_info(self) -> ModelInfo | None:
        if self.backend is None or self.status is Status.LOADING:
            return None
        if self._info is None or self._info[0] is not self.backend:  # read once per backend
            self._info = (self.backend, self.backend.info())
        return self._info[1]

    def health(self) -> dict[str, Any]:
        info = self.model_info()
        settings = self.settings
        body: dict[str, Any] = {
            "status": self.status.value,
            "model": {
                "name": info.name if info else settings.model_source,
                "kind": info.kind.value if info else None,
                "backend": info.backend if info else None,
                "device": info.device if info else None,
                "max_length": info.max_length if info else None,
                "dimension": info.dimension if info else None,
                "dtype": info.dtype if info else None,
                "selected_because": self.backend.selection if info and self.backend else None,
                "details": dict(info.details) if info else {},
                "capabilities": info.capabilities if info else [],
                "family": info.family if info else None,
                "activation": info.activation if info and info.kind is ModelKind.CROSS_ENCODER else None,
                "prompts": dict(info.prompts) if info else {},
                "default_prompt_name": (settings.default_prompt_name or info.default_prompt_name)
                if info
                else None,
                "instruction": info.instruction if info else None,
            },
            "controller": {
                "max_parallel_requests": settings.max_parallel_requests,
                "max_queue_size": settings.max_queue_size,
                "batch_size": self.batch_size,
                "current_batch_limit": self.controller.batch_limit if self.controller else self.batch_size,
                "queued": self.controller.queued if self.controller else 0,
                "in_flight": self.controller.in_flight if self.controller else 0,
            },
            "resources": self.resources.view(),
            "cache": self.cache_stats(),
            "jobs": self.jobs.health(),
            "uptime_s": round(self.metrics.uptime_s(), 3),
        }
        if self.error:
            body["error"] = self.error
        elif body["jobs"]["status"] != "ok" and self.status is Status.HEALTHY:
            # Inference still answers (and /readyz says ready); jobs are refused until it recovers.
            body["status"], body["error"] = "degraded", body["jobs"]["error"]
        return body

    def cache_stats(self) -> dict[str, object]:
        return self.cache.stats() if self.cache is not None else dict(DISABLED_STATS)

    def model_name(self) -> str:
        info = self.model_info()
        return info.name if info else self.settings.model_source
