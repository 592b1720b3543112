"""``python -m reranker.ops.manage COMMAND [PORT...]``: what manage_reranker.sh runs.

Commands: start, stop, restart, status, health, tail, cluster-start N, cluster-stop.
Exit codes: 0 all good; 1 something failed (an instance did not start, or runs
but is not healthy); 2 usage; 3 an instance asked about is down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, TypeVar

from reranker.ops.config import OpsConfig, OpsConfigError, load_ops_config
from reranker.ops.instances import Started, Stopped, describe, spawn, stop, wait_ready

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DOWN = 0, 1, 2, 3
S = TypeVar("S")
T = TypeVar("T")


COMMAND_HELP = {
    "start": "start daemons (default: $PORT), wait until each is ready",
    "stop": "SIGTERM (graceful drain), SIGKILL after STOP_TIMEOUT_S (default: all known)",
    "restart": "stop, then start",
    "status": "PID, port, uptime, health, backend/device of each instance",
    "health": "one health word per instance",
    "tail": "follow the log files",
    "cluster-start": "N instances on ports from $PORT (N > 1: JOB_BACKEND=redis, or --local-jobs)",
    "cluster-stop": "stop every instance that has a PID file under $RUN_DIR",
}


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<14} {text}" for name, text in COMMAND_HELP.items())
    parser = argparse.ArgumentParser(
        prog="manage_reranker.sh",
        usage="%(prog)s [--json] COMMAND [PORT...]",
        description="Run and watch reranker server instances.",
        epilog=f"commands:\n{commands}\n\nexit codes: 0 ok, 1 failed or unhealthy, 2 usage, 3 down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--local-jobs",
        action="store_true",
        help="cluster-start: let each instance keep its own jobs (no client sends jobs through the balancer)",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs="*", help="ports (or N for cluster-start)")
    return parser


def _each(items: Sequence[S], work: Callable[[S], T]) -> list[T]:
    """Run ``work`` for every instance at once (instances load and drain in parallel)."""
    with ThreadPoolExecutor(max(1, len(items))) as pool:
        return list(pool.map(work, items))


class Manager:
    def __init__(self, config: OpsConfig, as_json: bool) -> None:
        self.config = config
        self.layout = config.layout
        self.as_json = as_json

    def emit(self, payload: Any, lines: Sequence[str]) -> None:
        print(json.dumps(payload, indent=2) if self.as_json else "\n".join(lines), flush=True)

    # --- commands -------------------------------------------------------------------
    def _start(self, ports: Sequence[int]) -> list[Started]:
        launched = [spawn(self.layout, port, self.config.python, self.config.child_env) for port in ports]

        def ready(started: Started) -> Started:
            if started.already_running:
                return started
            return wait_ready(self.layout, started, self.config.host, self.config.start_timeout_s)

        return _each(launched, ready)

    def _stop(self, ports: Sequence[int]) -> list[Stopped]:
        return _each(ports, lambda port: stop(self.layout, port, self.config.stop_timeout_s))

    def start(self, ports: Sequence[int]) -> int:
        started = self._start(ports)
        self.emit([asdict(r) for r in started], [_start_line(r) for r in started])
        return _start_exit(started)

    def stop(self, ports: Sequence[int]) -> int:
        stopped = self._stop(ports)
        self.emit([asdict(r) for r in stopped], [_stop_line(r, self.config.stop_timeout_s) for r in stopped])
        return EXIT_OK

    def restart(self, ports: Sequence[int]) -> int:
        stopped = self._stop(ports)
        started = self._start(ports)
        self.emit(
            {"stopped": [asdict(r) for r in stopped], "started": [asdict(r) for r in started]},
            [_stop_line(r, self.config.stop_timeout_s) for r in stopped] + [_start_line(r) for r in started],
        )
        return _start_exit(started)

    def status(self, ports: Sequence[int]) -> int:
        rows = _each(ports, lambda port: describe(self.layout, port, self.config.host))
        self.emit(rows, _status_table(rows))
        return _status_exit(rows)

    def health(self, ports: Sequence[int]) -> int:
        rows = _each(ports, lambda port: describe(self.layout, port, self.config.host))
        self.emit(
            {str(row["port"]): row["health"] for row in rows},
            [f"{row['port']}: {row['health']}" for row in rows],
        )
        return _status_exit(rows)

    def tail(self, ports: Sequence[int]) -> int:
        files = [str(self.layout.log_file(port)) for port in ports]
        os.execvp("tail", ["tail", "-n", "50", "-F", *files])
        return EXIT_FAILED  # not reached

    def cluster_start(self, count: int) -> int:
        return self.start([self.config.default_port + i for i in range(count)])

    def cluster_stop(self) -> int:
        return self.stop(self.layout.known_ports())


def per_instance_jobs_refusal(environ: Mapping[str, str], count: int, local_jobs: bool) -> str | None:
    """Why ``count`` instances must not start with the job store they would have, or None.

    With JOB_BACKEND=local (the default) each instance keeps its own jobs: a job submitted
    through the balancer is unknown to the other instances (404 when the status read lands
    there). ``local_jobs`` (--local-jobs) accepts that, but not one JOB_STORE_DIR for all.
    """
    backend = (environ.get("JOB_BACKEND") or "local").strip().lower()
    if count < 2 or backend == "redis":
        return None
    store_dir = (environ.get("JOB_STORE_DIR") or "").strip()
    if local_jobs and store_dir:
        return (
            f"cluster-start {count}: the instances would share JOB_STORE_DIR={store_dir}, and each would "
            "take the others' jobs for its own; unset it, or use JOB_BACKEND=redis (DEPLOYMENT.md)."
        )
    if local_jobs:
        return None
    return (
        f"cluster-start {count}: JOB_BACKEND={backend} keeps each instance's jobs to itself, so a job "
        "submitted through the load balancer (POST /v1/jobs, /run) is unknown to the other instances. "
        "Set JOB_BACKEND=redis and REDIS_URL=redis://HOST:6379/0 (one queue shared by every instance; "
        "DEPLOYMENT.md), or pass --local-jobs if no client sends jobs through the balancer."
    )


def _start_exit(results: Sequence[Started]) -> int:
    return EXIT_FAILED if any(not r.ready and not r.already_running for r in results) else EXIT_OK


def _start_line(result: Started) -> str:
    if result.already_running:
        return f"port {result.port}: {result.message}"
    return f"port {result.port}: ready (PID {result.pid})" if result.ready else f"FAILED {result.message}"


def _stop_line(result: Stopped, timeout_s: float) -> str:
    if result.how == "not_running":
        return f"port {result.port}: not running"
    if result.how == "sigkill":
        return (
            f"port {result.port}: PID {result.pid} did not exit within {timeout_s:g}s of SIGTERM; "
            "sent SIGKILL (requests in flight were lost)"
        )
    return (
        f"port {result.port}: stopped PID {result.pid} gracefully (SIGTERM, drained in {result.seconds:g}s)"
    )


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _status_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    header = ("PORT", "PID", "UPTIME", "HEALTH", "BACKEND/DEVICE", "MODEL")
    table = [header] + [
        (
            str(row["port"]),
            str(row["pid"] or "-"),
            _uptime(row["uptime_s"]),
            row["health"] + (" (stale PID file removed)" if row["stale_pid_file_removed"] else ""),
            f"{row['backend']}/{row['device']}" if row["backend"] else "-",
            row["model"] or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]


def _status_exit(rows: Sequence[dict[str, Any]]) -> int:
    if any(not row["running"] for row in rows):
        return EXIT_DOWN
    return EXIT_OK if all(row["health"] == "healthy" for row in rows) else EXIT_FAILED


COMMANDS = set(COMMAND_HELP)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    if all(arg.startswith("-") and arg not in ("-h", "--help") for arg in given):
        parser.print_help(sys.stderr)  # no command: say which there are
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        manager = Manager(load_ops_config(environ), args.json)
    except OpsConfigError as exc:
        print(f"manage_reranker.sh: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        numbers = [int(value) for value in args.args]
    except ValueError:
        print(f"manage_reranker.sh: expected numbers, got {' '.join(args.args)}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "cluster-start":
        if len(numbers) != 1 or numbers[0] < 1:
            print("usage: manage_reranker.sh cluster-start N [--local-jobs]", file=sys.stderr)
            return EXIT_USAGE
        refusal = per_instance_jobs_refusal(manager.config.child_env, numbers[0], args.local_jobs)
        if refusal is not None:
            print(f"manage_reranker.sh: {refusal}", file=sys.stderr)
            return EXIT_USAGE
        return manager.cluster_start(numbers[0])
    if args.command == "cluster-stop":
        return manager.cluster_stop()
    ports = numbers or (
        manager.layout.known_ports() if args.command in ("status", "health", "stop", "tail") else []
    )
    ports = ports or [manager.config.default_port]
    return getattr(manager, args.command)(ports)


if __name__ == "__main__":
    sys.exit(main())
