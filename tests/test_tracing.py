"""OpenTelemetry traces end to end: a real OTLP/HTTP receiver decodes what the server exports.

With OTEL_EXPORTER_OTLP_ENDPOINT set, a request is a span continuing the caller's ``traceparent``
(directly and through the shipped nginx config), with children tokenize, queue and one batch per
model batch it rode in; unset, nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import gzip
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the otel extra (requirements-otel.txt)")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.errors import StartupError
from tests.conftest import make_settings
from tests.nginx_proxy import running_nginx
from tests.scripts import REPO_ROOT, wait_for
from tests.server import ServerThread

DOCUMENTS = [f"document number {i} " + "word " * (i % 5) for i in range(7)]
BODY = {"query": "which document", "documents": DOCUMENTS}


def value_of(any_value) -> object:
    return getattr(any_value, any_value.WhichOneof("value"))


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces bodies decoded into plain span dicts."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                receiver.collect(self.path, request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def collect(self, path: str, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {kv.key: value_of(kv.value) for kv in span.attributes},
                            "service": resource.get("service.name"),
                        }
                    )
        with self._lock:
            self.paths.append(path)
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[dict]:
        with self._lock:
            return [span for span in self.spans if span["trace_id"] == trace_id]

    def request_span(self, trace_id: str) -> dict | None:
        return next((s for s in self.trace(trace_id) if "http.request.method" in s["attributes"]), None)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def traced_app(receiver: OtlpReceiver, **values: object):
    settings = make_settings(
        otel_exporter_otlp_endpoint=receiver.url, otel_service_name="reranker-under-test", **values
    )
    return create_app(settings, backend=FakeBackend(ModelKind.CROSS_ENCODER))


def caller() -> tuple[str, str, str]:
    """A caller's trace id, span id and ``traceparent`` header (sampled)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def test_a_request_is_a_span_of_the_caller_s_trace_with_tokenize_queue_and_batch_children(
    receiver: OtlpReceiver,
) -> None:
    trace_id, parent_id, traceparent = caller()
    with ServerThread(traced_app(receiver, batch_size=3)) as server, server.client() as client:
        response = client.post("/rerank", json=BODY, headers={"traceparent": traceparent})
        untraced = client.post("/rerank", json=BODY)  # no traceparent: a trace of its own
        assert client.get("/health").status_code == 200
    assert response.status_code == 200 and untraced.status_code == 200
    # The server stopped: its lifespan flushed every span (nothing waits for the batch delay).
    wait_for(lambda: receiver.request_span(trace_id) is not None, "the request span at the receiver")
    assert set(receiver.paths) == {"/v1/traces"}

    request = receiver.request_span(trace_id)
    assert request["parent_span_id"] == parent_id
    assert request["name"] == "POST /rerank"
    assert request["service"] == "reranker-under-test"
    attributes = request["attributes"]
    assert attributes["http.request.method"] == "POST" and attributes["url.path"] == "/rerank"
    assert attributes["http.response.status_code"] == 200
    assert attributes["reranker.request_id"] == response.headers["x-request-id"]
    assert attributes["reranker.model"] == "fake"

    children = [s for s in receiver.trace(trace_id) if s["parent_span_id"] == request["span_id"]]
    names = sorted({s["name"] for s in children})
    assert names == ["batch", "queue", "tokenize"], names
    (tokenize,) = [s for s in children if s["name"] == "tokenize"]
    (queue,) = [s for s in children if s["name"] == "queue"]
    batches = sorted((s for s in children if s["name"] == "batch"), key=lambda s: s["start"])
    assert len(batches) >= 3  # 7 documents in batches of at most 3
    assert sum(b["attributes"]["reranker.batch.request_items"] for b in batches) == len(DOCUMENTS)
    for batch in batches:
        facts = batch["attributes"]
        assert (facts["reranker.model"], facts["reranker.backend"], facts["reranker.dtype"]) == (
            "fake",
            "fake",
            "float32",
        )
        assert 1 <= facts["reranker.batch.size"] <= 3
        assert facts["reranker.batch.padded_tokens"] >= facts["reranker.batch.tokens"] > 0
        assert request["start"] <= batch["start"] <= batch["end"] <= request["end"]
    assert request["start"] <= tokenize["start"] <= tokenize["end"] <= queue["start"]
    assert queue["end"] == batches[0]["start"]  # queued from admission until its first batch started
    assert int(response.headers["x-batch-size"]) == max(
        b["attributes"]["reranker.batch.size"] for b in batches
    )

    others = [s for s in receiver.spans if s["trace_id"] != trace_id]
    roots = [s for s in others if "http.request.method" in s["attributes"]]
    assert [(s["attributes"]["url.path"], s["parent_span_id"]) for s in roots] == [
        ("/rerank", "")
    ]  # no probe


@pytest.mark.slow  # a system tool (nginx)
def test_the_caller_s_trace_continues_through_nginx(receiver: OtlpReceiver, tmp_path: Path) -> None:
    trace_id, parent_id, traceparent = caller()
    with ServerThread(traced_app(receiver)) as server:
        upstream = (
            f"upstream reranker_cluster {{\n    server 127.0.0.1:{server.port};\n    keepalive 4;\n}}\n"
        )
        with running_nginx(tmp_path, upstream) as url:
            response = httpx.post(
                f"{url}/rerank", json=BODY, headers={"traceparent": traceparent}, timeout=30
            )
            assert response.status_code == 200
            assert server.app.state.tracing.flush()
            wait_for(lambda: receiver.request_span(trace_id) is not None, "the span of the proxied request")
    request = receiver.request_span(trace_id)
    assert request["parent_span_id"] == parent_id
    assert request["attributes"]["reranker.request_id"] == response.headers["x-request-id"]
    assert {s["name"] for s in receiver.trace(trace_id)} == {"POST /rerank", "tokenize", "queue", "batch"}


def test_without_the_endpoint_nothing_of_opentelemetry_is_imported() -> None:
    script = """
import sys
from starlette.testclient import TestClient
from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.settings import load_settings

app = create_app(load_settings(environ={}), backend=FakeBackend(ModelKind.CROSS_ENCODER))
with TestClient(app) as client:
    response = client.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert response.status_code == 200, response.text
assert app.state.tracing is None and "reranker.tracing" in sys.modules
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_endpoint_without_the_packages_fails_start_up_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    with pytest.raises(StartupError) as failed:
        settings = make_settings(otel_exporter_otlp_endpoint="http://127.0.0.1:4318")
        create_app(settings, backend=FakeBackend(ModelKind.CROSS_ENCODER))
    assert 'pip install ".[otel]"' in failed.value.message and "\n" not in failed.value.message
