"""OpenTelemetry traces, on when OTEL_EXPORTER_OTLP_ENDPOINT is set.

Each request (health and metrics probes aside) is a server span named after its route
(``POST /rerank``), continuing the caller's W3C ``traceparent`` (nginx passes it on), with
child spans ``tokenize``, ``queue`` (admission until its first model batch started) and one
``batch`` per model batch its items rode in (size, padded and real tokens, model name, backend,
dtype). Batches are shared by requests and run in worker threads, so the controller only notes
each traced request's batches (perf_counter times) and the child spans are made afterwards with
explicit times. Spans leave through a BatchSpanProcessor (its own thread, never the event loop)
as OTLP/HTTP protobuf to ``{endpoint}/v1/traces``; the app's lifespan flushes them at shutdown.

Off, nothing of OpenTelemetry is imported: ``setup`` returns None and every hook is a None check.
The tracer provider belongs to the app (``app.state.tracing``), never the global one.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from reranker.errors import StartupError

if TYPE_CHECKING:
    from starlette.types import Scope

    from reranker.backends.base import ModelInfo
    from reranker.engine.controller import InferenceResult
    from reranker.settings import Settings

INSTALL = 'pip install ".[otel]"'
SKIPPED_PATHS = frozenset({"/livez", "/readyz", "/health", "/metrics"})  # probes: not traced

# The request being served, when it is traced (set by the middleware for the handler's task).
current_trace: ContextVar[RequestTrace | None] = ContextVar("current_trace", default=None)


def setup(settings: Settings) -> Tracing | None:
    """The app's tracing, or None when OTEL_EXPORTER_OTLP_ENDPOINT is unset (nothing imported)."""
    if not settings.otel_exporter_otlp_endpoint:
        return None
    return Tracing(settings.otel_exporter_otlp_endpoint, settings.otel_service_name)


class Tracing:
    def __init__(self, endpoint: str, service_name: str) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise StartupError(
                f"OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                f"({exc.name} is missing): {INSTALL}"
            ) from None
        self.endpoint = f"{endpoint.rstrip('/')}/v1/traces"
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False
        )
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.endpoint)))
        self.tracer = self.provider.get_tracer("reranker")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._offset_ns = time.time_ns() - time.perf_counter_ns()  # perf_counter -> epoch, once

    def epoch_ns(self, perf_counter_s: float) -> int:
        return int(perf_counter_s * 1e9) + self._offset_ns

    def begin(self, scope: Scope) -> RequestTrace | None:
        """The request's span, child of the caller's ``traceparent``; current for its handler."""
        if scope.get("path") in SKIPPED_PATHS:
            return None
        carrier = {}
        for name, value in scope.get("headers", ()):
            if name in (b"traceparent", b"tracestate"):
                carrier[name.decode()] = value.decode("latin-1")
        method = scope.get("method", "")
        span = self.tracer.start_span(
            method,
            context=self._propagator.extract(carrier) if carrier else None,
            kind=self._trace.SpanKind.SERVER,
            start_time=self.epoch_ns(time.perf_counter()),
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        )
        request = RequestTrace(self, span, self._trace.set_span_in_context(span))
        request.token = current_trace.set(request)
        return request

    def end(self, request: RequestTrace, scope: Scope, status: int, request_id: str) -> None:
        span = request.span
        route = getattr(scope.get("route"), "path", None)
        method = scope.get("method", "")
        span.update_name(f"{method} {route}" if route else method)
        attributes: dict[str, Any] = {"http.response.status_code": status, "reranker.request_id": request_id}
        if route:
            attributes["http.route"] = route
        model = (scope.get("state") or {}).get("model")
        if model is not None:
            attributes["reranker.model"] = model.name
        if status >= 500:
            attributes["error.type"] = str(status)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.set_attributes(attributes)
        request.open = False
        span.end(end_time=self.epoch_ns(time.perf_counter()))
        if request.token is not None:
            current_trace.reset(request.token)

    def flush(self, timeout_ms: int = 30_000) -> bool:
        """Export every ended span now (blocking: off the event loop)."""
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking: the lifespan calls it in a thread)."""
        self.provider.shutdown()


class RequestTrace:
    """One traced request: its span, and the context its child spans hang from."""

    __slots__ = ("_context", "_tracing", "open", "span", "token")

    def __init__(self, tracing: Tracing, span: Any, context: Any) -> None:
        self._tracing = tracing
        self._context = context
        self.span = span
        self.open = True
        self.token: Token[RequestTrace | None] | None = None

    def child(
        self, name: str, started: float, ended: float, attributes: dict[str, Any] | None = None
    ) -> None:
        """A child span from ``started`` to ``ended`` (perf_counter seconds)."""
        if not self.open:
            return
        tracing = self._tracing
        span = tracing.tracer.start_span(
            name, context=self._context, start_time=tracing.epoch_ns(started), attributes=attributes
        )
        span.end(end_time=tracing.epoch_ns(ended))

    def tokenized(self, started: float, items: int) -> None:
        self.child("tokenize", started, time.perf_counter(), {"reranker.items": items})

    def inferred(self, result: InferenceResult, info: ModelInfo) -> None:
        """The request's ``queue`` span and one ``batch`` span per model batch it rode in."""
        log = result.batch_log or ()
        first_batch = min(
            (batch.started for batch in log), default=result.admitted_at + result.queue_ms / 1e3
        )
        self.child("queue", result.admitted_at, first_batch)
        model = {"reranker.model": info.name, "reranker.backend": info.backend, "reranker.dtype": info.dtype}
        for batch in log:
            attributes = {
                **model,
                "reranker.batch.size": batch.size,
                "reranker.batch.padded_tokens": batch.padded_tokens,
                "reranker.batch.tokens": batch.tokens,
                "reranker.batch.request_items": batch.items,
            }
            self.child("batch", batch.started, batch.ended, attributes)
