"""Per-request bookkeeping shared by the inference endpoints: metrics and timing headers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import Response

from reranker.engine.runtime import Runtime
from reranker.engine.service import Timing
from reranker.errors import RerankerError

Handler = Callable[[Request], Awaitable[Response]]


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def inference_endpoint(name: str) -> Callable[[Handler], Handler]:
    """Count every request of the endpoint in /metrics, by outcome."""

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def observed(request: Request) -> Response:
            metrics = runtime_of(request).metrics
            started = time.perf_counter()
            try:
                response = await handler(request)
            except RerankerError as exc:
                metrics.record_request(name, exc.error_type, _ms_since(started))
                raise
            except Exception:
                metrics.record_request(name, "internal_error", _ms_since(started))
                raise
            metrics.record_request(name, None, _ms_since(started))
            return response

        return observed

    return decorate


def timing_ms(timing: Timing, started: float) -> dict[str, float]:
    return {
        "queue": round(timing.queue_ms, 3),
        "inference": round(timing.inference_ms, 3),
        "total": round(_ms_since(started), 3),
    }


def timing_headers(timing: Timing, started: float) -> dict[str, str]:
    return {
        "x-queue-time-ms": f"{timing.queue_ms:.3f}",
        "x-inference-time-ms": f"{timing.inference_ms:.3f}",
        "x-total-time-ms": f"{_ms_since(started):.3f}",
        "x-batch-size": str(timing.batch_size),
        "x-cache-hits": str(timing.cache_hits),
    }


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
