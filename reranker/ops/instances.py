"""Server instances as daemons: one PID file and one log file per port.

Standard library only, so ``status`` and ``stop`` work before (or without) the
virtualenv. A PID file whose process is gone, or now belongs to another
program, is stale: it is removed wherever it is found.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

POLL_S = 0.1


@dataclass(frozen=True)
class Layout:
    """Where PID files and logs of the instances live."""

    run_dir: Path
    log_dir: Path

    def pid_file(self, port: int) -> Path:
        return self.run_dir / f"reranker-{port}.pid"

    def log_file(self, port: int) -> Path:
        return self.log_dir / f"reranker-{port}.log"

    def known_ports(self) -> list[int]:
        ports = []
        for path in self.run_dir.glob("reranker-*.pid"):
            suffix = path.stem.removeprefix("reranker-")
            if suffix.isdigit():
                ports.append(int(suffix))
        return sorted(ports)


@dataclass(frozen=True)
class Started:
    port: int
    pid: int
    already_running: bool
    ready: bool
    message: str
    log_offset: int = 0  # where this start's lines begin in its log file


@dataclass(frozen=True)
class Stopped:
    port: int
    pid: int | None
    how: str  # "sigterm" | "sigkill" | "not_running"
    seconds: float
    exit_code: int | None


def is_reranker_process(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process running the reranker server."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X") and b"reranker" in cmdline


def running_pid(layout: Layout, port: int) -> tuple[int | None, bool]:
    """The PID serving ``port`` (or None) and whether a stale PID file was just removed."""
    path = layout.pid_file(port)
    try:
        pid = int(path.read_text().strip())
    except FileNotFoundError:
        return None, False
    except ValueError:
        pid = -1
    if pid > 0 and is_reranker_process(pid):
        return pid, False
    path.unlink(missing_ok=True)
    return None, True


def http_json(url: str, timeout_s: float = 2.0) -> tuple[int | None, dict[str, Any] | None]:
    """GET a JSON endpoint: (status, body); (None, None) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return None, None


def base_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def spawn(
    layout: Layout, port: int, python: str, env: Mapping[str, str], extra_args: Sequence[str] = ()
) -> Started:
    """Start a daemon on ``port`` unless one already runs there (then say so, with its PID)."""
    pid, _ = running_pid(layout, port)
    if pid is not None:
        return Started(port, pid, True, False, f"already running (PID {pid})")
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.log_file(port), "ab") as log, open(os.devnull, "rb") as devnull:
        log_offset = log.seek(0, os.SEEK_END)
        process = subprocess.Popen(
            [python, "-m", "reranker", "--port", str(port), *extra_args],
            env={**env, "PORT": str(port)},
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: the caller's Ctrl-C or exit does not reach it
        )
    temporary = layout.pid_file(port).with_suffix(".pid.tmp")
    temporary.write_text(f"{process.pid}\n")
    temporary.replace(layout.pid_file(port))
    return Started(port, process.pid, False, False, f"started on port {port} (PID {process.pid})", log_offset)


def wait_ready(layout: Layout, started: Started, host: str, timeout_s: float) -> Started:
    """Wait until the instance answers /readyz 200, exits, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    url = base_url(host, started.port) + "/readyz"
    while True:
        status, _ = http_json(url, timeout_s=1.0)
        if status == 200:
            return replace(started, ready=True)
        if not is_reranker_process(started.pid):
            layout.pid_file(started.port).unlink(missing_ok=True)
            log = layout.log_file(started.port)
            cause = start_failure_cause(log, started.log_offset)
            return replace(
                started,
                message=f"port {started.port}: the server exited during start-up: {cause} (log: {log})",
            )
        if time.monotonic() > deadline:
            message = f"port {started.port}: not ready after {timeout_s:g}s (PID {started.pid} still running)"
            return replace(started, message=message)
        time.sleep(POLL_S)


def start_failure_cause(log: Path, offset: int = 0) -> str:
    """Why a server that exited during start-up did, from what this start wrote to its log
    (from ``offset`` on): the line that says so (``reranker: model failed to load: ...``,
    uvicorn's ``[Errno 98] ... address already in use``), else the last error, else the last line."""
    try:
        with open(log, "rb") as file:
            file.seek(offset)
            text = file.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"its log {log} cannot be read ({exc.strerror})"
    lines = [_message_of(line.strip()) for line in text.splitlines() if line.strip()]
    if not lines:
        return "it wrote nothing to its log"
    for line in reversed(lines):
        if line.startswith("reranker:") or "address already in use" in line.lower():
            return line
    for line in reversed(lines):
        if "error" in line.lower() and not line.startswith("Traceback"):
            return line
    return lines[-1]


TEXT_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ \S+ \[[^\]]*\]: ")


def _message_of(line: str) -> str:
    """A log line's message, without the text format's prefix or the JSON format's wrapping."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return line
        return str(record.get("message", line)) if isinstance(record, dict) else line
    return TEXT_LOG_PREFIX.sub("", line)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait for ``pid`` to exit; True if it did within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        pidfd = None
    try:
        while is_reranker_process(pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], min(remaining, 1.0))
            else:
                time.sleep(min(remaining, POLL_S))
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def stop(layout: Layout, port: int, timeout_s: float) -> Stopped:
    """SIGTERM (graceful drain), wait up to ``timeout_s``, then SIGKILL; say which happened."""
    pid, _ = running_pid(layout, port)
    if pid is None:
        return Stopped(port, None, "not_running", 0.0, None)
    started = time.monotonic()
    how = "sigterm"
    try:
        os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout_s):
            how = "sigkill"
            os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, 10.0)
    except ProcessLookupError:
        pass
    layout.pid_file(port).unlink(missing_ok=True)
    return Stopped(port, pid, how, round(time.monotonic() - started, 2), None)


def process_uptime_s(pid: int) -> float | None:
    """Seconds since ``pid`` started, from /proc (works even when /health does not answer)."""
    try:
        start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return round(boot_uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 1)


def describe(layout: Layout, port: int, host: str) -> dict[str, Any]:
    """One instance's state for ``status``: PID, uptime, health and backend/device."""
    pid, stale = running_pid(layout, port)
    row: dict[str, Any] = {
        "port": port,
        "pid": pid,
        "running": pid is not None,
        "stale_pid_file_removed": stale,
        "uptime_s": process_uptime_s(pid) if pid else None,
        "health": "down",
        "backend": None,
        "device": None,
        "model": None,
        "log": str(layout.log_file(port)),
    }
    if pid is None:
        return row
    status, body = http_json(base_url(host, port) + "/health")
    if body is None:
        row["health"] = "not_answering"
        return row
    model = body.get("model") or {}
    row.update(
        health=body.get("status", "unknown") if status in (200, 503) else f"http_{status}",
        backend=model.get("backend"),
        device=model.get("device"),
        model=", ".join(body["models"]) if isinstance(body.get("models"), dict) else model.get("name"),
        queued=(body.get("controller") or {}).get("queued"),
    )
    return row
