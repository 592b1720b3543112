"""LOG_FORMAT=json on the real server process: every line parses, carries the request id, and
holds no document text and no API key unless LOG_REQUEST_BODIES=true."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.scripts import REPO_ROOT, free_ports, script_env, wait_for
from tests.server import ServerThread

SECRET_DOCUMENT = "PURPLE-ELEPHANT-INVOICE-7731"
KEY = "sk-live-0123456789abcdef"


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_json_log_lines_carry_the_request_id_and_no_secrets(tmp_path: Path) -> None:
    port = free_ports(1)
    env = script_env(tmp_path, port, LOG_FORMAT="json", API_KEYS=KEY, BACKEND="torch")
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "reranker", "--port", str(port)],
            env=env,
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: ready(url) or server.poll() is not None, "server ready", 180)
            body = {"query": "invoice", "documents": [SECRET_DOCUMENT, "a cat"]}
            headers = {"authorization": f"Bearer {KEY}", "x-request-id": "req-abc"}
            answered = httpx.post(f"{url}/rerank", json=body, headers=headers, timeout=30)
            refused = httpx.post(f"{url}/rerank", json=body, headers={"authorization": f"Bearer {KEY}x"})
            anonymous = httpx.post(
                f"{url}/v1/embeddings", json={"input": ["x"]}, headers=headers | {"x-request-id": ""}
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert (answered.status_code, refused.status_code, anonymous.status_code) == (200, 401, 200)
    assert answered.headers["x-request-id"] == "req-abc"
    text = log_path.read_text()
    assert SECRET_DOCUMENT not in text and KEY not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    ours = [line for line in lines if line.get("request_id") == "req-abc"]
    request_line = next(line for line in ours if line["logger"] == "reranker.request")
    assert request_line["endpoint"] == "/rerank" and request_line["status"] == 200
    assert request_line["items"] == 2 and request_line["batch_size"] == 3  # query + 2 documents: one batch
    assert request_line["queue_ms"] >= 0 and request_line["inference_ms"] > 0
    assert not any(line["logger"] == "uvicorn.access" for line in lines)  # one line per request: ours
    assert len([line for line in ours if line["logger"] == "reranker.request"]) == 1
    refused_line = next(
        line for line in lines if line["logger"] == "reranker.request" and line["status"] == 401
    )
    assert refused_line["request_id"] not in ("req-abc", None)
    made = anonymous.headers["x-request-id"]
    assert any(line.get("request_id") == made and line.get("endpoint") == "/v1/embeddings" for line in lines)


@pytest.mark.parametrize("log_bodies", [False, True])
def test_request_bodies_are_logged_only_when_asked(
    log_bodies: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(
        make_settings(log_request_bodies=log_bodies), backend=FakeBackend(ModelKind.CROSS_ENCODER)
    )
    caplog.set_level(logging.INFO, logger="reranker.request")
    with ServerThread(app) as server, server.client() as client:
        client.post("/rerank", json={"query": "q", "documents": [SECRET_DOCUMENT]})
    records = [r for r in caplog.records if r.name == "reranker.request" and r.endpoint == "/rerank"]
    assert len(records) == 1
    assert (SECRET_DOCUMENT in getattr(records[0], "body", "")) is log_bodies


def test_text_request_lines_carry_the_same_facts_as_json(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(make_settings(), backend=FakeBackend(ModelKind.CROSS_ENCODER))
    caplog.set_level(logging.INFO, logger="reranker.request")
    with ServerThread(app) as server, server.client() as client:
        client.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
        client.post("/rerank", json={"query": "q"})
    served, refused = [r for r in caplog.records if r.name == "reranker.request" and r.endpoint == "/rerank"]
    assert served.getMessage() == (
        f"POST /rerank 200 in {served.duration_ms:.1f} ms: items 2, queue {served.queue_ms:.1f} ms, "
        f"inference {served.inference_ms:.1f} ms, batch {served.batch_size}"
    )
    assert refused.getMessage() == f"POST /rerank 422 in {refused.duration_ms:.1f} ms"
