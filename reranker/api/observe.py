"""Per-request bookkeeping of the inference endpoints: API key, metrics, timing headers.

A handler publishes what the request cost (items, queue and inference time, batch
size) with ``timing_headers``; the ``observed`` wrapper counts the outcome
in /metrics and the request-log middleware reads the same facts from
``request.state``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import Response

from reranker.api.auth import authorize
from reranker.api.errors import status_for
from reranker.engine.metrics import Metrics
from reranker.engine.model import ServedModel
from reranker.engine.runtime import Runtime
from reranker.engine.service import Timing
from reranker.errors import RerankerError

Handler = Callable[[Request], Awaitable[Response]]


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def model_of(request: Request, requested: str | None, capability: str) -> ServedModel:
    """The model this request goes to: the one in its path (``/models/{name}/...``), else the one
    its body names, else the first able to ``capability``. Counted under that model in /metrics."""
    runtime = runtime_of(request)
    in_path = request.path_params.get("model_name")
    if in_path is not None:
        runtime.named(in_path)  # a name in the path must exist, even on a one-model server
        requested = in_path
    model = runtime.model_for(requested, capability)
    request.state.model = model
    return model


def _metrics_of(request: Request) -> Metrics:
    """The metrics of the model that served the request; a request refused before any model was
    chosen counts under the server's one model, or apart (``unrouted``) on a server of several."""
    model = getattr(request.state, "model", None)
    if model is not None:
        return model.metrics
    runtime = runtime_of(request)
    return runtime.default.metrics if len(runtime.models) == 1 else runtime.unrouted


def observed(handler: Handler, name: str, timed: bool = True) -> Handler:
    """``handler``, requiring the API key (when keys are set) and counting every request under
    ``name`` in /metrics (endpoints.py wraps each counted endpoint).

    ``timed`` False (the job routes): counted by status and failure reason, but kept out of the
    latency window and histogram, which describe inference requests (a status poll takes a
    millisecond, a /runsync wait up to RUNSYNC_WAIT_S)."""

    @wraps(handler)
    async def observe(request: Request) -> Response:
        started = time.perf_counter()
        try:
            authorize(request)
            response = await handler(request)
        except RerankerError as exc:
            _metrics_of(request).record_request(
                name, exc.error_type, _ms_since(started), status_for(exc), timed=timed
            )
            raise
        except Exception:
            _metrics_of(request).record_request(name, "internal_error", _ms_since(started), 500, timed=timed)
            raise
        _metrics_of(request).record_request(name, None, _ms_since(started), response.status_code, timed=timed)
        return response

    return observe


def timing_ms(timing: Timing, started: float) -> dict[str, float]:
    return {
        "queue": round(timing.queue_ms, 3),
        "inference": round(timing.inference_ms, 3),
        "total": round(_ms_since(started), 3),
    }


def timing_headers(request: Request, timing: Timing, started: float, items: int) -> dict[str, str]:
    """The x-*-time-ms headers; also records the request's cost for /metrics and the request log."""
    request.state.items = items
    request.state.timing = timing
    if timing.batch_size:  # it reached the model (not only the cache)
        _metrics_of(request).record_timing(timing.queue_ms, timing.inference_ms)
    return {
        "x-queue-time-ms": f"{timing.queue_ms:.3f}",
        "x-inference-time-ms": f"{timing.inference_ms:.3f}",
        "x-total-time-ms": f"{_ms_since(started):.3f}",
        "x-batch-size": str(timing.batch_size),
        "x-cache-hits": str(timing.cache_hits),
    }


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
