"""The application factory: ``create_app(settings, backend=None)``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route

from reranker.api import docs, embed, health, infinity, jobs, landing, rerank, runpod, tei
from reranker.api.auth import load_api_keys
from reranker.api.errors import EXCEPTION_HANDLERS
from reranker.api.middleware import RequestLogMiddleware
from reranker.api.observe import INFERENCE_ENDPOINTS
from reranker.api.openapi import openapi_json
from reranker.api.prometheus import prometheus_registry
from reranker.backends.base import Backend
from reranker.engine.runtime import BackendFactory, Runtime, default_backend_factory
from reranker.settings import Settings, load_settings

# The routes that work on one model: also under /models/{name}/ (that model, whatever the body says).
MODEL_ROUTES = [
    Route("/rerank", rerank.rerank, methods=["POST"]),
    Route("/v1/rerank", rerank.rerank_v1, methods=["POST"]),
    Route("/v2/rerank", rerank.rerank_v2, methods=["POST"]),
    Route("/embed", embed.embed, methods=["POST"]),
    Route("/v1/jobs", jobs.submit_job, methods=["POST"]),
    # RunPod's serverless routes: the same jobs, in RunPod's shape (see runpod.py).
    Route("/run", runpod.run, methods=["POST"]),
    Route("/runsync", runpod.runsync, methods=["POST"]),
    Route("/v1/embeddings", embed.openai_embeddings, methods=["POST"]),
    # Text-embeddings-inference's routes (its /rerank and /embed share ours: see tei.py).
    Route("/", tei.root, methods=["POST"]),
    Route("/info", tei.info, methods=["GET"]),
    Route("/tokenize", tei.tokenize, methods=["POST"]),
    # Infinity's routes, under a prefix: its /rerank body is ours (see infinity.py).
    Route(infinity.PREFIX + "/rerank", infinity.rerank, methods=["POST"]),
    Route(infinity.PREFIX + "/embeddings", infinity.embeddings, methods=["POST"]),
]
ROUTES = [
    *MODEL_ROUTES,
    Mount("/models/{model_name}", routes=MODEL_ROUTES),
    Route("/v1/jobs/{job_id}", jobs.job_status, methods=["GET"]),
    Route("/v1/jobs/{job_id}", jobs.cancel_job, methods=["DELETE"]),
    Route("/status/{id}", runpod.status, methods=["GET"]),
    Route("/cancel/{id}", runpod.cancel, methods=["POST"]),
    Route("/health", health.health, methods=["GET"]),
    Route("/livez", health.livez, methods=["GET"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/metrics", health.metrics, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs.docs_page, methods=["GET"]),
    Route(docs.STATIC_PREFIX + "{name}", docs.docs_static, methods=["GET"]),
    Route("/", landing.root, methods=["GET"]),
    Route("/models", infinity.models, methods=["GET"]),
    Route("/v1/models", infinity.models, methods=["GET"]),
    Route(infinity.PREFIX + "/models", infinity.infinity_models, methods=["GET"]),
]


def create_app(
    settings: Settings,
    backend: Backend | None = None,
    *,
    backend_factory: BackendFactory | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    backends: Mapping[str, Backend] | None = None,
) -> Starlette:
    """Build the app. ``backend`` injects a ready backend (tests), ``backends`` one per model name
    (MODELS); else each model is loaded at start-up."""
    runtime = Runtime(settings, backend, backend_factory or default_backend_factory, backends)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start(on_fatal)
        try:
            yield
        finally:
            await runtime.stop()

    middleware = [Middleware(RequestLogMiddleware, log_bodies=settings.log_request_bodies)]
    app = Starlette(
        routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, middleware=middleware, lifespan=lifespan
    )
    app.state.runtime = runtime
    app.state.api_keys = load_api_keys(settings)
    app.state.prometheus = prometheus_registry(runtime)
    for model in runtime.models:
        model.metrics.expect_endpoints(INFERENCE_ENDPOINTS)
    return app


def app_from_environment() -> Starlette:
    """For ``uvicorn --factory reranker.api.app:app_from_environment`` (dev auto-reload)."""
    return create_app(load_settings())
