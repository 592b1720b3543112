"""A real uvicorn serving ``create_app`` on a free loopback port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import httpx
import uvicorn
from starlette.applications import Starlette

from reranker.protocol import uvicorn_config

READY_TIMEOUT_S = 120.0


class ServerThread:
    def __init__(self, app: Starlette) -> None:
        self.app = app
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's own configuration (connection bounds included), on this socket.
        config = uvicorn_config(app, app.state.runtime.settings, log_level="warning", lifespan="on")
        config.timeout_graceful_shutdown = 5
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def runtime(self):
        return self.app.state.runtime

    def start(self, wait_ready: bool = True) -> ServerThread:
        self._thread.start()
        if wait_ready:
            self.wait_until(lambda: self.runtime.ready.is_set(), "model load")
        return self

    def wait_until(self, condition, what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait for an observable condition (not a fixed sleep), failing after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"server never reached: {what}")
            time.sleep(0.01)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.stop()
