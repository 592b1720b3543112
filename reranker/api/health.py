"""GET /health, /livez, /readyz and /metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from reranker.api.auth import authorize
from reranker.api.observe import runtime_of
from reranker.api.prometheus import CONTENT_TYPE, exposition
from reranker.api.responses import ORJSONResponse
from reranker.engine.model import ServedModel
from reranker.engine.runtime import Status
from reranker.errors import MalformedRequestError


async def health(request: Request) -> Response:
    runtime = runtime_of(request)
    ready = runtime.status is Status.HEALTHY
    return ORJSONResponse(runtime.health(), status_code=200 if ready else 503)


async def livez(request: Request) -> Response:
    """200 while the process can serve; 503 once a task it cannot work without has died (the
    batcher, the job worker), so systemd or Kubernetes restarts it."""
    failure = runtime_of(request).task_failure()
    if failure:
        return ORJSONResponse({"status": "broken", "error": failure}, status_code=503)
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
    """JSON by default; the Prometheus text format for ``?format=prometheus`` or an Accept
    header that asks for text/plain or OpenMetrics (what Prometheus sends)."""
    runtime = runtime_of(request)
    if runtime.settings.protect_metrics:
        authorize(request)
    if _wants_prometheus(request):
        return Response(exposition(request.app.state.prometheus), media_type=CONTENT_TYPE)
    if len(runtime.models) == 1:
        snapshot = _model_metrics(runtime.default)
        snapshot["model"] = runtime.default.name
    else:  # the server's totals, and each model's own
        snapshot = runtime.metrics.snapshot()
        snapshot["queue_depth"] = sum(c.queued for m in runtime.models for c in m.controllers())
        snapshot["in_flight_batches"] = sum(c.in_flight for m in runtime.models for c in m.controllers())
        snapshot["models"] = {model.name: _model_metrics(model) for model in runtime.models}
    snapshot["status"] = runtime.status.value
    return ORJSONResponse(snapshot)


def _model_metrics(model: ServedModel) -> dict[str, object]:
    snapshot = model.metrics.snapshot()
    controller = model.controller
    snapshot["queue_depth"] = sum(c.queued for c in model.controllers())  # /embed_all's included
    snapshot["in_flight_batches"] = sum(c.in_flight for c in model.controllers())
    cost = controller.batch_cost if controller else None
    snapshot["batch_overhead_tokens"] = round(cost.overhead, 1) if cost else None
    snapshot["batch_quadratic_per_token"] = cost.quadratic if cost else None
    snapshot["cache"] = model.cache_stats()
    return snapshot


def _wants_prometheus(request: Request) -> bool:
    requested = request.query_params.get("format")
    if requested is not None:
        if requested not in ("json", "prometheus"):
            raise MalformedRequestError(f"format: {requested!r} is not one of 'json', 'prometheus'")
        return requested == "prometheus"
    accept = request.headers.get("accept", "")
    return "application/json" not in accept and ("text/plain" in accept or "openmetrics" in accept)
