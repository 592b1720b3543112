"""start_reranker.sh and manage_reranker.sh run for real: daemons, PID files, status, stop, logrotate."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.scripts import REPO_ROOT, free_ports, pids_serving, require_tool, run_script, script_env

QUERY = {"query": "capital of france", "documents": ["bananas are yellow", "Paris is in France"]}


def finished_pid() -> int:
    """The PID of a process that has already exited (what a stale PID file holds)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def status_json(env: dict[str, str], *ports: str) -> tuple[int, list[dict]]:
    result = run_script("manage_reranker.sh", "--json", "status", *ports, env=env)
    return result.returncode, json.loads(result.stdout)


def test_daemon_lifecycle_with_stale_pid_env_file_second_start_and_graceful_stop(tmp_path: Path) -> None:
    port = free_ports(1)
    env_file = tmp_path / "settings.env"
    env_file.write_text("# operator settings\nBATCH_SIZE=7\nexport LOG_LEVEL='info'\n")
    env = script_env(tmp_path, port, ENV_FILE=str(env_file))
    pid_file = tmp_path / "run" / f"reranker-{port}.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{finished_pid()}\n")

    code, rows = status_json(env, str(port))
    assert code == 3 and rows[0]["health"] == "down" and rows[0]["stale_pid_file_removed"]
    assert not pid_file.exists()

    pid_file.write_text(f"{finished_pid()}\n")  # stale again: start must clean it up and start
    started = run_script("start_reranker.sh", "daemon", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int(pid_file.read_text())
    assert f"ready (PID {pid})" in started.stdout
    try:
        code, rows = status_json(env)
        assert code == 0
        assert rows == [rows[0]] and rows[0]["pid"] == pid and rows[0]["health"] == "healthy"
        assert (rows[0]["backend"], rows[0]["device"]) == ("torch", "cpu")
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["controller"]["batch_size"] == 7  # from the env file

        again = run_script("start_reranker.sh", "daemon", env=env)
        assert again.returncode == 0
        assert again.stdout.strip() == f"port {port}: already running (PID {pid})"  # said once
        assert pids_serving(port) == [pid]

        human = run_script("manage_reranker.sh", "status", env=env)
        assert human.returncode == 0
        assert str(pid) in human.stdout and "healthy" in human.stdout and "torch/cpu" in human.stdout
    finally:
        stopped = run_script("start_reranker.sh", "stop", env=env)
    assert stopped.returncode == 0
    assert f"stopped PID {pid} gracefully (SIGTERM" in stopped.stdout
    assert pids_serving(port) == []
    assert not pid_file.exists()
    code, rows = status_json(env, str(port))
    assert code == 3 and rows[0]["health"] == "down" and not rows[0]["running"]
    log = (tmp_path / "logs" / f"reranker-{port}.log").read_text()
    assert "drained: every admitted request finished" in log and "Traceback" not in log


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    port = free_ports(1)
    env = script_env(tmp_path, port, STOP_TIMEOUT_S="1")
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ignoring SIGTERM', flush=True)\n"
            "time.sleep(600)\n",
            "reranker",  # looks like a server to the PID-file check
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "ignoring SIGTERM"
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / f"reranker-{port}.pid").write_text(f"{stubborn.pid}\n")
        result = run_script("manage_reranker.sh", "--json", "stop", str(port), env=env)
        assert result.returncode == 0
        assert json.loads(result.stdout)[0]["how"] == "sigkill"
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
    finally:
        if stubborn.poll() is None:
            stubborn.kill()


def test_a_daemon_that_cannot_start_prints_the_cause(tmp_path: Path) -> None:
    port = free_ports(1)
    env = script_env(tmp_path, port)
    log = tmp_path / "logs" / f"reranker-{port}.log"
    log.parent.mkdir()
    log.write_text("an earlier start's line: ERROR something else\n")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        busy = run_script("manage_reranker.sh", "start", str(port), env=env)
    assert busy.returncode == 1
    assert "address already in use" in busy.stdout and str(log) in busy.stdout, busy.stdout
    assert "something else" not in busy.stdout  # only this start's lines are read

    bad_model = run_script(
        "manage_reranker.sh", "start", str(port), env={**env, "MODEL_NAME": str(tmp_path / "no-such-model")}
    )
    assert bad_model.returncode != 0
    assert f"model path {tmp_path / 'no-such-model'} does not exist" in bad_model.stdout + bad_model.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    env = script_env(tmp_path, free_ports(1))
    assert run_script("start_reranker.sh", "sideways", env=env).returncode == 2
    assert run_script("manage_reranker.sh", "cluster-start", "zero", env=env).returncode == 2
    assert run_script("manage_reranker.sh", "frobnicate", env=env).returncode == 2
    bad_port = run_script("manage_reranker.sh", "status", env={**env, "PORT": "eighty"})
    assert bad_port.returncode == 2 and "PORT='eighty'" in bad_port.stderr


def test_cluster_start_refuses_jobs_each_instance_would_keep_to_itself(tmp_path: Path) -> None:
    env = {**script_env(tmp_path, free_ports(2)), "JOB_BACKEND": "local", "JOB_STORE_DIR": ""}
    refused = run_script("manage_reranker.sh", "cluster-start", "2", env=env)
    assert refused.returncode == 2
    assert "JOB_BACKEND=local" in refused.stderr and "JOB_BACKEND=redis" in refused.stderr
    assert "--local-jobs" in refused.stderr and "REDIS_URL" in refused.stderr
    shared_dir = {**env, "JOB_STORE_DIR": str(tmp_path / "jobs")}
    shared = run_script("manage_reranker.sh", "cluster-start", "2", "--local-jobs", env=shared_dir)
    assert shared.returncode == 2 and f"JOB_STORE_DIR={tmp_path / 'jobs'}" in shared.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())  # nothing started


def test_logrotate_copytruncate_keeps_a_running_daemon_logging(tmp_path: Path) -> None:
    logrotate = require_tool("logrotate")
    port = free_ports(1)
    env = script_env(tmp_path, port)
    assert run_script("manage_reranker.sh", "start", str(port), env=env).returncode == 0
    try:
        log_dir = tmp_path / "logs"
        shipped = (REPO_ROOT / "deploy" / "logrotate" / "reranker").read_text()
        assert "/opt/reranker/logs/*.log" in shipped and "su reranker reranker" in shipped
        user = f"su {os.getuid()} {os.getgid()}"
        config = shipped.replace("/opt/reranker/logs", str(log_dir)).replace("su reranker reranker", user)
        (tmp_path / "logrotate.conf").write_text(config)
        rotated = subprocess.run(
            [logrotate, "--force", "--state", str(tmp_path / "state"), str(tmp_path / "logrotate.conf")],
            capture_output=True,
            text=True,
        )
        assert rotated.returncode == 0, rotated.stderr
        log = log_dir / f"reranker-{port}.log"
        copies = [p for p in log_dir.iterdir() if p != log]
        assert len(copies) == 1 and "ready:" in copies[0].read_text()
        assert log.stat().st_size == 0
        response = httpx.post(f"http://127.0.0.1:{port}/rerank", json=QUERY, timeout=30)
        assert response.status_code == 200
        deadline = time.monotonic() + 10  # the request's log line is written as the response ends
        while b"POST /rerank" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        after = log.read_bytes()
        assert b"POST /rerank" in after and not after.startswith(b"\0")  # appended, no hole
    finally:
        run_script("manage_reranker.sh", "stop", str(port), env=env)
