"""Running the server in this process (``serve``) or, for development, in a child process
that is restarted when the code changes (``serve_with_reload``). Both log the same way
(reranker.logging_setup), say ``ready: ...`` when the model answers, log one line per
request, and end with exit code 1 when the model fails to load.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.supervisors import ChangeReload

from reranker.api.app import create_app
from reranker.errors import JobStoreStartupError, StartupError
from reranker.logging_setup import configure_logging
from reranker.protocol import uvicorn_config
from reranker.serve import DrainingServer
from reranker.settings import Settings, load_settings


def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> str | None:
    """Serve until a signal (drained, then None) or a model that fails to load (its error).
    A job store that cannot be used (JobStoreStartupError) is raised."""
    fatal: list[BaseException] = []
    server: DrainingServer | None = None

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    server = DrainingServer(uvicorn_config(app, settings), app.state.runtime, settings.shutdown_timeout_s)
    server.run(sockets=sockets)
    if not fatal:
        return None
    if isinstance(fatal[0], JobStoreStartupError):
        raise fatal[0]  # a configuration problem, as a bad setting: exit 2
    return fatal[0].message if isinstance(fatal[0], StartupError) else str(fatal[0])


def serve_with_reload(settings: Settings, overrides: dict[str, str | None]) -> int:
    """Development: the server runs in a child process that is restarted when a file of the
    package changes. The child serves exactly as ``serve`` does (same logging, same
    ``ready`` line, one log line per request); a model that fails to load ends the child and
    this process with exit code 1 instead of a server answering 503 forever."""
    config = uvicorn.Config(  # what the reloader needs; the child builds its own (see serve)
        "reranker.launch:serve",  # never imported: the child runs dev_child
        host=settings.host,
        port=settings.port,
        log_config=None,
        reload=True,
        reload_dirs=[str(Path(__file__).parent)],  # the package
    )
    reloader = DevReload(config, partial(dev_child, overrides, os.getpid()), [config.bind_socket()])
    reloader.run()
    return 1 if reloader.child_failed else 0


def dev_child(
    overrides: dict[str, str | None], reloader_pid: int, sockets: list[socket.socket] | None = None
) -> None:
    """The reloaded child: settings read afresh from the environment (which holds ``.env``'s
    lines: the parent read it) and the flags."""
    try:
        settings = load_settings(overrides=overrides)
        configure_logging(settings.log_level, settings.log_format)
    except StartupError as exc:
        print(f"reranker: {exc.message}", file=sys.stderr)
        os.kill(reloader_pid, CHILD_FAILED)
        sys.exit(2)
    try:
        fatal = serve(settings, sockets)
    except StartupError as exc:
        print(f"reranker: {exc.message}", file=sys.stderr)
        os.kill(reloader_pid, CHILD_FAILED)
        sys.exit(2)
    if fatal is not None:
        print(f"reranker: model failed to load: {fatal}", file=sys.stderr)
        os.kill(reloader_pid, CHILD_FAILED)
        sys.exit(1)


CHILD_FAILED = signal.SIGUSR1  # the child tells the reloader it gave up


class DevReload(ChangeReload):
    """uvicorn's reloader, which also ends (with ``child_failed``) when the child gives up."""

    child_failed = False

    def startup(self) -> None:
        signal.signal(CHILD_FAILED, self._child_failed)
        super().startup()

    def _child_failed(self, sig: int, frame: FrameType | None) -> None:
        self.child_failed = True
        self.should_exit.set()
