"""The application factory: ``create_app(settings, backend=None)``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from reranker.api.auth import load_api_keys
from reranker.api.endpoints import METRIC_ENDPOINTS, routes
from reranker.api.errors import EXCEPTION_HANDLERS
from reranker.api.middleware import RequestLogMiddleware
from reranker.api.prometheus import prometheus_registry
from reranker.backends.base import Backend
from reranker.engine.runtime import BackendFactory, Runtime, default_backend_factory
from reranker.settings import Settings, load_settings
from reranker.tracing import setup as setup_tracing

ROUTES = routes()


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
    tracing = setup_tracing(settings)  # None unless OTEL_EXPORTER_OTLP_ENDPOINT is set

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start(on_fatal)
        try:
            yield
        finally:
            await runtime.stop()
            if tracing is not None:  # the spans still queued leave before the process does
                await asyncio.to_thread(tracing.shutdown)

    middleware = [Middleware(RequestLogMiddleware, log_bodies=settings.log_request_bodies, tracing=tracing)]
    app = Starlette(
        routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, middleware=middleware, lifespan=lifespan
    )
    app.state.runtime = runtime
    app.state.tracing = tracing
    app.state.api_keys = load_api_keys(settings)
    app.state.prometheus = prometheus_registry(runtime)
    for model in runtime.models:
        model.metrics.expect_endpoints(METRIC_ENDPOINTS)
    if len(runtime.models) > 1:
        runtime.unrouted.expect_endpoints(METRIC_ENDPOINTS)
    return app


def app_from_environment() -> Starlette:
    """For ``uvicorn --factory reranker.api.app:app_from_environment`` (dev auto-reload)."""
    return create_app(load_settings())
