"""uvicorn with a graceful drain.

On SIGTERM (or Ctrl-C) the runtime flips to ``draining``: /health and /readyz
answer 503, new work is refused with 503 + Retry-After, and every admitted
request finishes; then uvicorn shuts down and the process exits 0. The drain is
bounded by SHUTDOWN_TIMEOUT_S; a second signal forces an immediate exit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from reranker.engine.runtime import Runtime

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.signalled = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it re-raises the signal after shutdown, so the exit code would not be 0.
        if self.signalled or self._loop is None:
            log.warning("second shutdown signal: exiting without waiting")
            self.force_exit = True
            self.should_exit = True
            return
        self.signalled = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        unfinished = self._runtime.begin_drain()
        log.info("draining: %d requests admitted, waiting up to %gs", unfinished, self._shutdown_timeout_s)
        try:
            await asyncio.wait_for(self._runtime.wait_idle(), self._shutdown_timeout_s)
            log.info("drained: every admitted request finished")
        except TimeoutError:
            log.warning("drain timed out after %gs; shutting down anyway", self._shutdown_timeout_s)
        self.should_exit = True
