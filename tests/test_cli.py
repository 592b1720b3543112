"""``python -m reranker`` as an operator runs it: a real process on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.scripts import free_ports


def test_cli_serves_the_embedded_model_and_exits_cleanly_on_sigterm() -> None:
    port = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "reranker", "--port", str(port), "--batch-size", "8"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert health is not None and health.status_code == 200, process.stdout and process.stdout.read()
        served = health.json()
        assert served["controller"]["batch_size"] == 8
        # A fresh process: its load is the only thing that grew it (a test session's shared
        # servers trim and grow the same process meanwhile, so this is checked here).
        assert served["model"]["memory_bytes"] > 1_000_000
        parallel = served["resources"]["parallel_batches"]  # MAX_PARALLEL_REQUESTS unset
        assert parallel == (2 if served["resources"]["cpus"] >= 2 else 1)
        assert served["controller"]["max_parallel_requests"] == parallel
        response = httpx.post(
            f"http://127.0.0.1:{port}/rerank",
            json={"query": "capital of france", "documents": ["bananas are yellow", "Paris is in France"]},
        )
        assert response.json()["results"][0]["index"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "Traceback" not in output
