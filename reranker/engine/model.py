"""One served model: its backend, controller, service, cache and metrics, and its ModelInfo
read once at load. The server (runtime.py) holds one per model and routes requests to them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from reranker.backends.base import Backend, Encoded, ModelInfo, TokenVectors
from reranker.engine import resources
from reranker.engine.adaptive import BatchSizer, process_rss_bytes
from reranker.engine.cache import DISABLED_STATS, PredictionCache
from reranker.engine.controller import DeviceGate, InferenceController
from reranker.engine.metrics import Metrics
from reranker.engine.quantize import calibration_texts, calibration_view
from reranker.engine.service import InferenceService
from reranker.errors import NotReadyError
from reranker.model_specs import ModelSpec
from reranker.settings import Settings

log = logging.getLogger(__name__)

BackendFactory = Callable[[Settings], Backend]
RELEASE_MEMORY_AFTER_ITEMS = 256  # idle after this much work: trim the allocator's arenas


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
    if info.strategy.takes_texts:
        (longest,) = backend.tokenize_texts([words])
    else:
        (longest,) = backend.tokenize_pairs([("calibration query", words)])
    batches = []
    for length in sorted({min(n, len(longest)) for n in (16, 64, 128)}):
        item = Encoded(ids=longest.ids[:length], type_ids=longest.type_ids[:length])
        batches.extend([[item] * size for size in sorted({1, min(8, batch_size)})])
    return batches


def prediction_cache(settings: Settings, info: ModelInfo) -> PredictionCache | None:
    if not settings.enable_prediction_cache:
        return None
    model = f"{info.name}|{info.backend}|{info.dtype}|{info.max_length}"
    return PredictionCache(model, settings.prediction_cache_size, settings.prediction_cache_ttl_s)


class ServedModel:
    """One model of the server. ``info`` is None until loaded, then never again."""

    def __init__(self, spec: ModelSpec, backend: Backend | None, gate: DeviceGate) -> None:
        self.spec = spec
        self.settings = spec.settings
        self.batch_size = spec.settings.batch_size  # until the backend is loaded: batch_size_for
        self.metrics = Metrics()
        self.backend = backend
        self.injected = backend is not None  # tests: a ready backend, its cost model unmeasured
        self.info: ModelInfo | None = None
        self.controller: InferenceController | None = None
        self.token_controller: InferenceController | None = None  # /embed_all, when the backend answers it
        self.service: InferenceService | None = None
        self.cache: PredictionCache | None = None
        self.error: str | None = None
        self.memory_bytes = 0  # resident memory its load added (measured)
        self._gate = gate
        self._trims: set[asyncio.Future[bool]] = set()  # allocator trims running in the executor

    @property
    def name(self) -> str:
        """The served name: MODELS' NAME, else the model's own name (its source until loaded)."""
        if self.spec.name:
            return self.spec.name
        return self.info.name if self.info else self.settings.model_source

    @property
    def ready(self) -> bool:
        return self.service is not None and self.failure() is None

    def controllers(self) -> list[InferenceController]:
        return [c for c in (self.controller, self.token_controller) if c is not None]

    def failure(self) -> str | None:
        for controller in self.controllers():
            if controller.failure:
                return controller.failure
        return None

    def serves(self, capability: str) -> bool:
        """``capability`` is one of ``ModelInfo.capabilities``, "embed_tokens" (its backend gives
        token vectors: /embed_all) or "any" (tokenize, info)."""
        if capability == "embed_tokens":
            return self.token_controller is not None
        return self.info is not None and (capability == "any" or capability in self.info.capabilities)

    def answers_to(self, requested: str) -> bool:
        """A request's ``model`` names this one: its served name, its source or its own name."""
        return requested in {self.name, self.settings.model_source, self.info.name if self.info else None}

    async def load(self, factory: BackendFactory, memory_limit_bytes: int, memory_because: str = "") -> None:
        """Load, warm up, calibrate and start the controller. Raises on any failure."""
        settings = self.settings
        calibration_texts(
            settings.embedding_calibration_file
        )  # a bad EMBEDDING_CALIBRATION_FILE stops start-up
        rss_before = process_rss_bytes()
        backend = self.backend or await asyncio.to_thread(factory, settings)
        await asyncio.to_thread(backend.warmup)
        batch_size = self.batch_size = batch_size_for(settings, backend)
        sizer = BatchSizer(
            initial=batch_size,
            maximum=max(settings.embedding_max_batch_size, batch_size),
            adaptive=settings.embedding_adaptive_batching,
            memory_limit_bytes=memory_limit_bytes,
            memory_because=memory_because,
        )
        controller = InferenceController(
            backend,
            batch_size=batch_size,
            max_parallel=settings.max_parallel_requests,
            max_queue=settings.max_queue_size,
            metrics=self.metrics,
            max_batch_tokens=settings.max_batch_tokens,
            batch_wait_s=settings.batch_wait_ms / 1000.0,
            group_by_length=settings.batch_length_grouping,
            sizer=sizer,
            max_request_s=settings.max_request_seconds or None,
            on_idle=self._after_burst,
            gate=self._gate,
        )
        if not self.injected:  # an injected backend (tests) starts with an unmeasured cost model
            await asyncio.to_thread(controller.calibrate, calibration_batches(backend, batch_size))
        self.memory_bytes = max(0, process_rss_bytes() - rss_before)
        controller.start()
        if backend.serves_token_vectors:  # its own queue and batches; the device gate is the same
            tokens = InferenceController(
                TokenVectors(backend),  # type: ignore[arg-type]
                batch_size=batch_size,
                max_parallel=settings.max_parallel_requests,
                max_queue=settings.max_queue_size,
                metrics=self.metrics,
                max_batch_tokens=settings.max_batch_tokens,
                group_by_length=settings.batch_length_grouping,
                max_request_s=None,
                gate=self._gate,
            )
            tokens.start()
            self.token_controller = tokens
        info = backend.info()
        self.backend, self.controller, self.info = backend, controller, info
        self.cache = prediction_cache(settings, info)
        self.service = InferenceService(
            backend,
            controller,
            settings.request_timeout_s,
            self.cache,
            settings.default_prompt_name,
            token_controller=self.token_controller,
        )
        named = f"{self.spec.name} = " if self.spec.name else ""
        log.info(
            "ready: %s%s (%s) on %s/%s, %s",
            named,
            info.name,
            info.kind.value,
            info.backend,
            info.device,
            info.dtype,
        )

    def require_service(self) -> InferenceService:
        if self.service is not None:
            return self.service
        raise NotReadyError(f"model {self.name} is still loading", retry_after_s=5)

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

    def cache_stats(self) -> dict[str, object]:
        return self.cache.stats() if self.cache is not None else dict(DISABLED_STATS)

    def health(self, selected_default_prompt: str | None = None) -> dict[str, Any]:
        """This model in /health: what runs, why, and its controller's state."""
        info, settings = self.info, self.settings
        default_prompt = selected_default_prompt or settings.default_prompt_name
        return {
            "name": self.name,
            "source": settings.model_source,
            "status": "ready" if self.ready else ("failed" if self.error else "loading"),
            "kind": info.kind.value if info else None,
            "backend": info.backend if info else None,
            "device": info.device if info else None,
            "max_length": info.max_length if info else None,
            "dimension": info.dimension if info else None,
            "dtype": info.dtype if info else None,
            "selected_because": self.backend.selection if info and self.backend else None,
            # Read now, not at load: a GPU backend's details hold its device memory in use.
            "details": dict(self.backend.info().details) if info and self.backend else {},
            "capabilities": info.capabilities if info else [],
            "family": info.family if info else None,
            "activation": info.activation if info and info.strategy.one_score else None,
            "prompts": dict(info.prompts) if info else {},
            "default_prompt_name": (default_prompt or info.default_prompt_name) if info else None,
            "instruction": info.instruction if info else None,
            "memory_bytes": self.memory_bytes,
            "embedding_calibration": calibration_view(self)
            if info and "embed" in info.capabilities
            else None,
        }

    def controller_health(self) -> dict[str, Any]:
        controller, settings = self.controller, self.settings
        parallel = controller.max_parallel if controller else settings.max_parallel_requests
        return {
            "max_parallel_requests": parallel,
            "max_queue_size": settings.max_queue_size,
            "batch_size": self.batch_size,
            "current_batch_limit": controller.batch_limit if controller else self.batch_size,
            "queued": sum(c.queued for c in self.controllers()),  # /embed_all's queue included
            "in_flight": sum(c.in_flight for c in self.controllers()),
        }
