"""The process manager's own settings, read once from the environment (call time, not import time).

Not the server's settings: these say where PID files and logs live, which Python starts
the servers and how long to wait; the server reads everything else itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reranker.ops.instances import Layout


class OpsConfigError(ValueError):
    """A variable the manager reads has a value it cannot use."""


@dataclass(frozen=True)
class OpsConfig:
    layout: Layout
    host: str
    default_port: int
    python: str  # the interpreter that runs the servers (the checkout's .venv)
    start_timeout_s: float
    stop_timeout_s: float
    child_env: dict[str, str]  # the environment every server starts with


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        raise OpsConfigError(f"{name}={raw!r}: not a number") from None
    if value < 0:
        raise OpsConfigError(f"{name}={raw!r}: must not be negative")
    return value


def load_ops_config(environ: Mapping[str, str] | None = None) -> OpsConfig:
    source = dict(os.environ if environ is None else environ)
    root = Path(source.get("REPO_ROOT") or Path.cwd())
    port = _number(source, "PORT", 8000)
    if port != int(port) or not 0 < port < 65536:
        raise OpsConfigError(f"PORT={source.get('PORT')!r}: not a TCP port")
    drain_s = _number(source, "SHUTDOWN_TIMEOUT_S", 30)
    return OpsConfig(
        layout=Layout(
            run_dir=Path(source.get("RUN_DIR") or root / "run"),
            log_dir=Path(source.get("LOG_DIR") or root / "logs"),
        ),
        host=source.get("HOST") or "127.0.0.1",
        default_port=int(port),
        python=source.get("RERANKER_PYTHON") or sys.executable,
        start_timeout_s=_number(source, "START_TIMEOUT_S", 180),
        stop_timeout_s=_number(source, "STOP_TIMEOUT_S", drain_s + 10),
        child_env=source,
    )
