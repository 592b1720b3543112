"""The first hour: ``python -m reranker`` reads ``.env`` as the scripts do."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx
import pytest

from reranker.__main__ import load_env_file, read_env_file
from tests.scripts import REPO_ROOT, free_ports, run_script, script_env


def test_env_file_is_read_with_the_scripts_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "test.env"
    env_file.write_text(
        "# a comment\n\nexport API_KEYS=\"k1,k2\"\nPORT='9001'\nBATCH_SIZE=8\r\n"
        "not a line\nLOG_LEVEL=$(rm -rf /)\n"
    )
    assert read_env_file(env_file) == {
        "API_KEYS": "k1,k2",
        "PORT": "9001",
        "BATCH_SIZE": "8",
        "LOG_LEVEL": "$(rm -rf /)",  # read, never executed
    }
    assert "ignoring malformed line" in capsys.readouterr().err
    environ = {"ENV_FILE": str(env_file), "PORT": "8000"}
    load_env_file(environ)
    assert environ["PORT"] == "8000" and environ["BATCH_SIZE"] == "8"  # the environment wins
    assert read_env_file(tmp_path / "absent.env") == {}


def test_python_m_reranker_honours_api_keys_from_dot_env(tmp_path: Path) -> None:
    """The security trap of the issue: API_KEYS in .env must protect the CLI-started server too."""
    port = free_ports(1)
    (tmp_path / ".env").write_text(f"API_KEYS=s3cret\nPORT={port}\nBACKEND=torch\nDTYPE=float32\n")
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "API_KEYS_FILE", "PORT", "ENV_FILE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "reranker"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline and process.poll() is None and answer is None:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/rerank", json={"query": "q", "documents": ["d"]}
                )
            except httpx.TransportError:
                time.sleep(0.1)
        assert answer is not None, process.stderr and process.stderr.read()
        assert answer.status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_manage_without_a_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from reranker.ops.manage import COMMAND_HELP, main

    assert main([], environ={}) == 2
    err = capsys.readouterr().err
    assert all(f"  {name} " in err for name in COMMAND_HELP), err
    with pytest.raises(SystemExit) as exited:
        main(["--help"], environ={})
    assert exited.value.code == 0 and "cluster-start" in capsys.readouterr().out


class LogLines:
    """A process's stderr, line by line, waited on without polling."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert process.stderr is not None
        stream = process.stderr
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, needle: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"the process ended before logging {needle!r}:\n" + "".join(self.seen))
            self.seen.append(line)
            if needle in line:
                return line


def test_dev_mode_logs_what_the_daemon_logs_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_ports(1)
    process = subprocess.Popen(
        [str(REPO_ROOT / "start_reranker.sh"), "dev"],
        env=script_env(tmp_path, port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = LogLines(process)
        serving = "serving all-MiniLM-L6-v2 (bi-encoder) with torch on cpu in float32: BACKEND=torch; "
        assert serving in log.wait_for("serving ")
        assert "Memory limit set to" in log.wait_for("Memory limit")
        assert "ready: all-MiniLM-L6-v2 (bi-encoder) on torch/cpu" in log.wait_for("ready:")
        answer = httpx.post(f"http://127.0.0.1:{port}/rerank", json={"query": "q", "documents": ["d"]})
        assert answer.status_code == 200
        request_line = log.wait_for("reranker.request")
        assert "POST /rerank 200" in request_line and answer.headers["x-request-id"] in request_line
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0


def test_dev_mode_exits_non_zero_when_the_model_fails_to_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a model directory, but not a loadable model
    env = script_env(tmp_path, free_ports(1), MODEL_NAME=str(broken))
    result = run_script("start_reranker.sh", "dev", env=env, timeout_s=180)
    assert result.returncode == 1, result.stderr
    assert f"reranker: model failed to load: Unrecognized model in {broken}" in result.stderr
