"""The request middleware: a request id for every request, and one log line when it ends.

The id is the caller's ``X-Request-ID`` when it is a sane token (letters, digits,
``._:-``, at most 128), else a fresh one; it is set for every log line written while
the request is served and returned in the response's
``X-Request-ID``. The closing line carries endpoint, status, items, queue and
inference time and batch size (what the handler put in ``request.state``), as JSON
fields and in the text line alike: the only line per request (uvicorn's access log is off);
health and metrics probes log at debug (LOG_LEVEL=debug shows them). Request bodies are
logged only with LOG_REQUEST_BODIES=true (they hold the users' documents); headers never are
(they hold API keys).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reranker.request_context import current_request_id
from reranker.tracing import Tracing

log = logging.getLogger("reranker.request")

VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
PROBE_PATHS = frozenset({"/livez", "/readyz", "/health", "/metrics"})
LOGGED_BODY_CHARS = 4096


_ID_PREFIX = uuid.uuid4().hex[:20]  # random per process, so instances behind nginx never collide
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A unique 32-hex-digit id: this process's random prefix and a counter (no uuid4 per request)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


class RequestLogMiddleware:
    """The request id and the closing log line; with ``tracing`` (reranker/tracing.py) the
    request's span too, begun and ended here."""

    def __init__(self, app: ASGIApp, log_bodies: bool = False, tracing: Tracing | None = None) -> None:
        self.app = app
        self.log_bodies = log_bodies
        self.tracing = tracing  # None: OTEL_EXPORTER_OTLP_ENDPOINT unset

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else new_request_id()
        token = current_request_id.set(request_id)
        trace = self.tracing.begin(scope) if self.tracing is not None else None
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        body = bytearray()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def receive_and_keep() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < LOGGED_BODY_CHARS:
                body.extend(message.get("body", b"")[: LOGGED_BODY_CHARS - len(body)])
            return message

        try:
            await self.app(scope, receive_and_keep if self.log_bodies else receive, send_with_id)
        finally:
            self._log(scope, status, (time.perf_counter() - started) * 1000, body)
            if trace is not None:
                self.tracing.end(trace, scope, status, request_id)
            current_request_id.reset(token)

    def _log(self, scope: Scope, status: int, duration_ms: float, body: bytearray) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path in PROBE_PATHS else logging.INFO
        if not log.isEnabledFor(level):
            return
        state = scope.get("state") or {}
        fields: dict[str, object] = {
            "endpoint": path,
            "method": scope.get("method"),
            "status": status,
            "duration_ms": round(duration_ms, 3),
        }
        if "items" in state:
            fields["items"] = state["items"]
        timing = state.get("timing")
        if timing is not None:
            fields.update(
                queue_ms=round(timing.queue_ms, 3),
                inference_ms=round(timing.inference_ms, 3),
                batch_size=timing.batch_size,
            )
        if self.log_bodies:
            fields["body"] = body.decode("utf-8", errors="replace")
        log.log(level, "%s", describe(fields), extra=fields)


def describe(fields: dict[str, object]) -> str:
    """The text of the closing line: the same facts as the JSON line's fields (LOG_FORMAT=text),
    e.g. ``POST /rerank 200 in 24.1 ms: items 2, queue 0.1 ms, inference 23.5 ms, batch 3``."""
    line = f"{fields['method']} {fields['endpoint']} {fields['status']} in {fields['duration_ms']:.1f} ms"
    facts = [f"items {fields['items']}"] if "items" in fields else []
    if "queue_ms" in fields:
        facts += [
            f"queue {fields['queue_ms']:.1f} ms",
            f"inference {fields['inference_ms']:.1f} ms",
            f"batch {fields['batch_size']}",
        ]
    return line + (": " + ", ".join(facts) if facts else "")
