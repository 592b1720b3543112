"""Graceful shutdown: SIGTERM while requests are in flight, on the real CLI process."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.scripts import free_ports

# Enough work that the 20 requests are still running when SIGTERM comes, with two batches at once.
DOCUMENTS = [f"passage {i} about bones, healing, fractures and recovery time " * 3 for i in range(32)]


def wait_for(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def health(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/health", timeout=5)
    except httpx.TransportError:
        return None


def admitted_count(url: str) -> int:
    """Requests waiting in the queue plus requests already answered."""
    queued = httpx.get(f"{url}/health", timeout=5).json()["controller"]["queued"]
    return queued + httpx.get(f"{url}/metrics", timeout=5).json()["successful_requests"]


def test_sigterm_drains_admitted_requests_refuses_new_ones_and_exits_zero() -> None:
    port = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reranker",
            "--port",
            str(port),
            "--batch-size",
            "8",
            "--shutdown-timeout-s",
            "60",
        ],
        # torch float32 on any CPU: the requests must still be running when SIGTERM comes
        env={**os.environ, "HF_HUB_OFFLINE": "1", "BACKEND": "torch", "DTYPE": "float32"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: (r := health(url)) is not None and r.status_code == 200)
        body = {"query": "how long does a fracture take to heal", "documents": DOCUMENTS}
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            admitted = [pool.submit(httpx.post, f"{url}/rerank", json=body, timeout=120) for _ in range(20)]
            wait_for(lambda: admitted_count(url) == 20)  # every request is admitted, most still queued
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: (r := health(url)) is None or r.json()["status"] == "draining")
            draining = health(url)
            readyz = httpx.get(f"{url}/readyz", timeout=5)
            refused = httpx.post(f"{url}/rerank", json=body, timeout=30)
            statuses = [f.result().status_code for f in admitted]
        assert draining is not None and draining.status_code == 503
        assert draining.json()["status"] == "draining"
        assert (readyz.status_code, readyz.json()["status"]) == (503, "draining")
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "not_ready"
        assert "retry-after" in refused.headers
        assert statuses == [200] * 20
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "drained: every admitted request finished" in output
