"""The server: its models, status, jobs and drain; a request asks it for a model by name.

Loading runs in the background so /livez answers and /health says ``loading`` while big
models load (one after another: each one's memory is measured as it loads). Any load failure,
or models that do not fit the memory limit, mark the server unhealthy and call ``on_fatal``
(the CLI uses it to exit non-zero), naming the model.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from reranker.backends.base import Backend, ModelInfo
from reranker.engine import resources
from reranker.engine.cache import PredictionCache
from reranker.engine.controller import DeviceGate, InferenceController
from reranker.engine.job_local import JobStore, LocalJobs
from reranker.engine.job_work import JobSpecError, spec_capability, work_from_spec
from reranker.engine.jobs import Job, JobBackend
from reranker.engine.metrics import Metrics
from reranker.engine.model import BackendFactory, ServedModel
from reranker.engine.service import InferenceService
from reranker.errors import (
    JobStoreStartupError,
    NotFoundError,
    NotReadyError,
    StartupError,
    UnsupportedOperationError,
)
from reranker.model_specs import model_specs
from reranker.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["BackendFactory", "Runtime", "Status", "default_backend_factory"]


SPARSE_HINT = '; a sparse model answers on /embed_sparse, /embed and in jobs of "type": "embed_sparse"'
TOKENS_HINT = "; token vectors (/embed_all) come from bi-encoders on BACKEND=torch"


class Status(StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


def default_backend_factory(settings: Settings) -> Backend:
    from reranker.backends.factory import create_backend

    return create_backend(settings)


def job_backend(settings: Settings) -> JobBackend:
    """The job store JOB_BACKEND names: this process's (local) or the cluster's (redis)."""
    if settings.job_backend == "redis":
        from reranker.engine.job_redis import RedisJobs

        return RedisJobs(settings)
    store = JobStore(Path(settings.job_store_dir)) if settings.job_store_dir else None
    return LocalJobs(settings.max_active_jobs, settings.job_result_ttl_s, store)


class Runtime:
    """The server. ``backend`` injects one ready backend (tests, one model); ``backends`` one per
    model name (tests, several models); else each model is loaded by ``backend_factory``."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend | None = None,
        backend_factory: BackendFactory = default_backend_factory,
        backends: Mapping[str, Backend] | None = None,
    ) -> None:
        self.resources = resources.detect(settings.max_parallel_requests, settings.inference_threads)
        if settings.max_parallel_requests == 0:  # unset: resolved once, what every model then reads
            settings = settings.model_copy(update={"max_parallel_requests": self.resources.parallel_batches})
        self.settings = settings
        specs = model_specs(settings)
        injected = dict(backends or {})
        if backend is not None:
            injected[specs[0].name or ""] = backend
        gate = DeviceGate(settings.max_parallel_requests)
        self.models = [ServedModel(spec, injected.get(spec.name or ""), gate) for spec in specs]
        # Requests refused before any model was chosen (a body that fails validation, an unknown
        # model) on a server of several: counted apart, not against the first model.
        self.unrouted = Metrics()
        self._status = Status.LOADING
        self._error: str | None = None
        self._factory = backend_factory
        self._loader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.jobs = job_backend(settings)

    # ---- the first model: what a one-model server (and its tests) reads -------------------

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    @property
    def metrics(self) -> Metrics:
        """Every model's counters together (the one model's own on a one-model server)."""
        if len(self.models) == 1:
            return self.default.metrics
        return Metrics.combined([*(model.metrics for model in self.models), self.unrouted])

    @property
    def backend(self) -> Backend | None:
        return self.default.backend

    @property
    def controller(self) -> InferenceController | None:
        return self.default.controller

    @property
    def cache(self) -> PredictionCache | None:
        return self.default.cache

    @property
    def batch_size(self) -> int:
        return self.default.batch_size

    def model_info(self) -> ModelInfo | None:
        return self.default.info

    def model_name(self) -> str:
        return self.default.name

    def require_service(self) -> InferenceService:
        self._require_ready()
        return self.default.require_service()

    # ---- status --------------------------------------------------------------------------

    @property
    def status(self) -> Status:
        """UNHEALTHY as soon as a supervised task (a batcher, the job worker) has died."""
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
        for model in self.models:
            failure = model.failure()
            if failure:
                return failure if len(self.models) == 1 else f"model {model.name}: {failure}"
        return self.jobs.failure

    # ---- life cycle ----------------------------------------------------------------------

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
        loading: ServedModel | None = None
        try:
            if any(not model.injected for model in self.models):
                from reranker.backends import threads

                await asyncio.to_thread(
                    threads.configure, self.resources.threads_per_batch, self.resources.cpus
                )
            settings = self.settings
            memory_for_batches = int(
                self.resources.memory_bytes * settings.embedding_max_memory_percent / 100
            )
            for loading in self.models:
                await loading.load(self._factory, memory_for_batches)
            loading = None
            self._check_names()
            self._check_memory()
            freeze_what_loaded()
            self.status = Status.HEALTHY
            self.jobs.start_worker(self._run_job)
        except Exception as exc:  # noqa: BLE001 - any load failure makes the server unhealthy
            reason = exc.message if isinstance(exc, StartupError) else (str(exc) or type(exc).__name__)
            if loading is not None:
                loading.error = reason
                if len(self.models) > 1:
                    reason = f"model {loading.spec.label} failed to load: {reason}"
            self.status, self.error = Status.UNHEALTHY, reason
            log.error("model failed to load: %s", reason)
            if on_fatal is not None:
                on_fatal(StartupError(reason) if loading is not None and len(self.models) > 1 else exc)
        finally:
            self.ready.set()

    def _check_names(self) -> None:
        names = [model.name for model in self.models]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise StartupError(
                f"models share a name: {', '.join(repeated)} (name them: MODELS=NAME=SOURCE,...)"
            )

    def _check_memory(self) -> None:
        """The loaded models must leave the memory limit room to run batches in."""
        from reranker.engine.adaptive import process_rss_bytes

        limit = self.resources.memory_bytes
        used = process_rss_bytes()
        if used and limit and used > limit:
            each = ", ".join(f"{m.name} {m.memory_bytes / 2**30:.2f} GiB" for m in self.models)
            raise StartupError(
                f"the models do not fit the memory limit: {used / 2**30:.2f} GiB resident after "
                f"loading ({each}) of {limit / 2**30:.2f} GiB ({self.resources.memory_because})"
            )

    async def _run_job(self, job: Job) -> dict[str, Any]:
        """One job's work, rebuilt from its validated input, through the model it was submitted
        for (a spec from before models were named: the first able to run it)."""
        assert job.spec is not None
        capability = spec_capability(job.spec)
        name = job.spec.get("model")
        if name is None:
            model = self.model_for(None, capability)
        else:
            model = next((m for m in self.models if m.answers_to(str(name)) and m.serves(capability)), None)
            if model is None:
                raise JobSpecError(
                    f"the job is for model {name!r}, which this instance does not serve "
                    f"(it serves {', '.join(self.served_names())}): run it where that model is served"
                )
        return await work_from_spec(job.spec)(job, model.require_service())

    def begin_drain(self) -> int:
        """Refuse new work from now on; returns how many admitted requests are unfinished."""
        if self.status is Status.HEALTHY:
            self.status = Status.DRAINING
        self.jobs.draining = True
        unfinished = 0
        for controller in (c for model in self.models for c in model.controllers()):
            controller.stop_admitting()
            unfinished += controller.queued + controller.in_flight
        return unfinished

    async def wait_idle(self) -> None:
        for controller in (c for model in self.models for c in model.controllers()):
            await controller.wait_idle()

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        await self.jobs.close()
        for controller in (c for model in self.models for c in model.controllers()):
            await controller.close()
        for model in self.models:
            if model.service is not None:
                model.service.close()
        gc.unfreeze()  # what was frozen at load may be garbage now (a process that serves again)

    # ---- routing -------------------------------------------------------------------------

    def _require_ready(self) -> None:
        status = self.status
        if status is Status.HEALTHY:
            return
        if status is Status.LOADING:
            raise NotReadyError("the model is still loading", retry_after_s=5)
        if status is Status.DRAINING:
            raise NotReadyError("the server is draining for shutdown", retry_after_s=1)
        raise NotReadyError(f"the model is not available: {self.error}", retry_after_s=30)

    def served_names(self) -> list[str]:
        return [model.name for model in self.models]

    def named(self, requested: str) -> ServedModel:
        """The model a request names; an unknown name is a 404 listing the served ones."""
        for model in self.models:
            if model.answers_to(requested):
                return model
        raise ModelNotFoundError(requested, self.served_names())

    def model_for(self, requested: str | None, capability: str | tuple[str, ...]) -> ServedModel:
        """The model that serves a request: the one it names (on a one-model server any name is
        that model, so a migrating client keeps its own), else the first able to serve it."""
        self._require_ready()
        wanted = (capability,) if isinstance(capability, str) else capability
        able = [model for model in self.models if any(model.serves(c) for c in wanted)]
        capability = " or ".join(wanted)
        if requested is not None and len(self.models) > 1:
            model = self.named(requested)
            if model not in able:
                hint = SPARSE_HINT if model.serves("embed_sparse") else ""
                hint = TOKENS_HINT if "embed_tokens" in wanted else hint
                raise UnsupportedOperationError(
                    f"model {model.name!r} ({model.info.kind.value if model.info else '?'}) cannot "
                    f"{capability}; models that can: {[m.name for m in able] or 'none'}{hint}"
                )
            return model
        if capability == "rerank":  # a cross-encoder first: what /rerank is for
            able.sort(key=lambda model: model.info is None or "embed" in model.info.capabilities)
        elif "embed" in wanted:  # /embed and RunPod: a dense bi-encoder before a sparse model
            able.sort(key=lambda model: not model.serves("embed"))
        if not able:
            kinds = ", ".join(f"{m.name} ({m.info.kind.value})" for m in self.models if m.info)
            sparse_here = "embed" in wanted and any(m.serves("embed_sparse") for m in self.models)
            hint = SPARSE_HINT if sparse_here else ""
            hint = TOKENS_HINT if "embed_tokens" in wanted else hint
            raise UnsupportedOperationError(f"the models served here cannot {capability}: {kinds}{hint}")
        return able[0]

    # ---- reports -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        default = self.default
        model_view = default.health()
        model_view["name"] = default.name
        body: dict[str, Any] = {
            "status": self.status.value,
            "model": {key: value for key, value in model_view.items() if key not in {"source", "status"}},
            "controller": default.controller_health(),
            "resources": self.resources.view(),
            "cache": self.cache_stats(),
            "jobs": self.jobs.health(),
            "uptime_s": round(default.metrics.uptime_s(), 3),
        }
        if len(self.models) > 1:
            body["models"] = {
                model.name: model.health()
                | {"controller": model.controller_health(), "cache": model.cache_stats()}
                for model in self.models
            }
        if self.error:
            body["error"] = self.error
        elif body["jobs"]["status"] != "ok" and self.status is Status.HEALTHY:
            # Inference still answers (and /readyz says ready); jobs are refused until it recovers.
            body["status"], body["error"] = "degraded", body["jobs"]["error"]
        return body

    def cache_stats(self) -> dict[str, object]:
        return self.default.cache_stats()


class ModelNotFoundError(NotFoundError):
    """A request named a model this server does not serve."""

    error_type = "model_not_found"

    def __init__(self, requested: str, served: Sequence[str]) -> None:
        super().__init__(f"model {requested!r} is not served here; served models: {', '.join(served)}")
        self.served = list(served)
        self.details = {"code": "model_not_found", "param": "model", "served_models": self.served}


def freeze_what_loaded() -> None:
    """Collect once, then take every object alive now (the libraries, the models' modules) out of
    the garbage collector's sight (``gc.freeze``). Without it, a full collection triggered by a
    request's allocations walks all of them while holding the interpreter lock: the event loop
    stopped answering, refusals included, for the length of that pass (a tenth of a second and
    more with torch and transformers loaded). Objects created later are collected as usual."""
    gc.collect()
    gc.freeze()
