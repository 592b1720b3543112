"""GET /health, /livez, /readyz and /metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from reranker.api.observe import runtime_of
from reranker.api.responses import ORJSONResponse
from reranker.engine.runtime import Status


async def health(request: Request) -> Response:
    runtime = runtime_of(request)
    ready = runtime.status is Status.HEALTHY
    return ORJSONResponse(runtime.health(), status_code=200 if ready else 503)


async def livez(request: Request) -> Response:
    return ORJSONResponse({"status": "alive"})


async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)
    ready = runtime.status is Status.HEALTHY
    headers = {} if ready else {"Retry-After": "5"}
    return ORJSONResponse(
        {"status": "ready" if ready else runtime.status.value},
        status_code=200 if ready else 503,
        headers=headers,
    )


async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    snapshot = runtime.metrics.snapshot()
    controller = runtime.controller
    snapshot["queue_depth"] = controller.queued if controller else 0
    snapshot["in_flight_batches"] = controller.in_flight if controller else 0
    snapshot["batch_overhead_tokens"] = round(controller.batch_overhead_tokens, 1) if controller else None
    snapshot["cache"] = runtime.cache_stats()
    snapshot["status"] = runtime.status.value
    return ORJSONResponse(snapshot)
