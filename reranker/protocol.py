"""Connection-level bounds uvicorn does not enforce, and the one place uvicorn is configured.

uvicorn (httptools) closes an idle keep-alive connection after ``timeout_keep_alive``, but
it arms that timer only after a response: a connection that never sends a request, or
dribbles its headers a byte a second, stays open for ever, and headers have no size limit.
``limit_concurrency`` answers 503 only once a request's headers have arrived. This
protocol adds, per connection:

- ``HEADER_READ_TIMEOUT_S``: the request line and headers must arrive within it (from the
  connection's start, or from the first byte of a keep-alive connection's next request);
  else 408 and close;
- ``MAX_HEADER_BYTES``: request line + headers beyond it are refused with 431 and close
  (counted while they arrive, so a client cannot make us buffer more);
- ``MAX_CONNECTIONS``: a connection over the cap is answered 503 + ``Retry-After`` and
  closed at once, without waiting for its request.

``uvicorn_config`` builds the server's configuration from the settings, for
``python -m reranker`` and for the tests' in-process server alike.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from reranker.settings import Settings

log = logging.getLogger(__name__)

LINGER_S = 2.0  # how long a refused connection's remaining input is read and dropped


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._discarding = False
        if len(self.connections) > self.max_connections:
            message = f"too many connections (MAX_CONNECTIONS={self.max_connections}); retry later"
            log.warning("connection refused: %s", message)
            self._refuse(503, message, retry=True)
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return  # a refused request's rest, read and dropped until the lingering close
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the first bytes of a keep-alive connection's next request
        awaiting = self._header_timer is not None
        super().data_received(data)
        if awaiting and self._header_timer is not None and not self.transport.is_closing():
            self._header_bytes += len(data)  # all of it was request line and headers
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, f"request headers are over MAX_HEADER_BYTES={self.max_header_bytes}")

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._header_bytes = 0
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            limit = f"HEADER_READ_TIMEOUT_S={self.header_timeout_s:g}"
            self._refuse(408, f"request line and headers did not arrive within {limit} s")

    def _refuse(self, status: int, message: str, retry: bool = False) -> None:
        """Answer ``status`` with a JSON error body and close the connection (one log line).

        The close lingers, as nginx's does: closing a socket that still has unread client
        data makes the kernel send a reset, and the client may never read the answer. So the
        answer is sent, the write side shut, and what the client still sends is read and
        dropped for up to LINGER_S before the connection is closed."""
        self._disarm_header_timer()
        error = {431: "headers_too_large", 408: "header_timeout", 503: "overloaded"}[status]
        body = orjson.dumps({"error": {"type": error, "message": message}})
        head = [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n",
        ]
        if retry:
            head.append(b"retry-after: 1\r\n")
        if status != 503:
            log.info("%s: %s", "{}:{}".format(*self.client) if self.client else "client", message)
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def protocol_for(settings: Settings) -> type[BoundedHttpToolsProtocol]:
    """The protocol class with this server's bounds."""
    return type(
        "ConfiguredHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "header_timeout_s": settings.header_read_timeout_s,
            "max_header_bytes": settings.max_header_bytes,
            "max_connections": settings.max_connections,
        },
    )


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration with this server's connection bounds."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": None,  # keep the logging configured by reranker.logging_setup
        "access_log": False,  # one line per request: the middleware's (probes at debug)
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "http": protocol_for(settings),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
