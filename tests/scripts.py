"""Running the operator scripts for real: environment, ports and a few waits on observable state."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from reranker.ops.instances import is_reranker_process

REPO_ROOT = Path(__file__).resolve().parent.parent


def script_env(tmp: Path, port: int, **extra: str) -> dict[str, str]:
    """The caller's environment plus an isolated run/log directory and a port."""
    env = {key: value for key, value in os.environ.items() if key not in ("ENV_FILE", "PYTHONPATH")}
    env.update(
        RUN_DIR=str(tmp / "run"),
        LOG_DIR=str(tmp / "logs"),
        ENV_FILE=str(tmp / "absent.env"),
        PORT=str(port),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        BACKEND="torch",  # these tests are about processes, not backend selection
        DTYPE="float32",  # nor precision: the same numbers on every CPU
    )
    env.update(extra)
    return env


def run_script(
    *args: str, env: Mapping[str, str], timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO_ROOT / args[0]), *args[1:]],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO_ROOT,
    )


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no run of free ports")


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"never happened: {what}")
        time.sleep(0.02)


def require_tool(name: str) -> str:
    """The path of a system tool; skipped when missing, except in CI (.ci/run installs them)."""
    path = shutil.which(name) or next(
        (str(p / name) for p in (Path("/usr/sbin"), Path("/sbin")) if (p / name).exists()), None
    )
    if path is None:
        if os.environ.get("REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail(f"{name} is required here (REQUIRE_SYSTEM_TOOLS=1) but not installed")
        pytest.skip(f"{name} is not installed (apt-get install it, as .ci/run does)")
    return path


def pids_serving(port: int) -> list[int]:
    """PIDs of live server processes started with ``--port PORT``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not is_reranker_process(int(proc.name)):
            continue
        try:
            args = [part.decode() for part in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "--port" in args and args[args.index("--port") + 1] == str(port):
            found.append(int(proc.name))
    return found
