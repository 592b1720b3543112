"""Hostile and unlucky clients against a real server on a free loopback port (bounded counts and times).

Every probe asserts what the server did: which status it answered, whether it closed the
connection, what ran on the model (batches recorded by the fake backend), what /metrics counted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from reranker.api.app import create_app
from reranker.backends.base import Encoded, ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.server import ServerThread

HEADER_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    settings = make_settings(
        header_read_timeout_s=HEADER_TIMEOUT_S, keepalive_timeout_s=0.5, max_connections=40
    )
    with ServerThread(create_app(settings, backend=FakeBackend(ModelKind.CROSS_ENCODER))) as running:
        yield running


def connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``limit_s``)."""
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


def test_connections_that_never_send_a_request_are_closed(server: ServerThread) -> None:
    silent = [connect(server) for _ in range(30)]
    started = time.monotonic()
    answers = [read_until_closed(sock) for sock in silent]
    for sock in silent:
        sock.close()
    assert {status_of(a) for a in answers} == {408}
    assert b"HEADER_READ_TIMEOUT_S=0.5" in answers[0]
    assert time.monotonic() - started < 10  # closed by the server, not left open


def test_headers_dribbled_a_byte_at_a_time_are_cut_off(server: ServerThread) -> None:
    sock = connect(server)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    closed = threading.Event()

    def dribble() -> None:
        for byte in request:
            if closed.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.02)  # the slow client being simulated, not synchronisation

    writer = threading.Thread(target=dribble)
    writer.start()
    answer = read_until_closed(sock)
    closed.set()
    writer.join()
    sock.close()
    assert status_of(answer) == 408


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer " + "k" * 1_000_000}, {f"X-Filler-{i}": "v" * 1000 for i in range(200)}],
    ids=["one-1MB-header", "200-1KB-headers"],
)
def test_oversized_headers_are_431_and_closed(server: ServerThread, headers: dict[str, str]) -> None:
    sock = connect(server)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    with contextlib.suppress(OSError):  # the server may answer before the whole header is sent
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    answer = read_until_closed(sock)
    sock.close()
    assert status_of(answer) == 431 and b"MAX_HEADER_BYTES=16384" in answer
    with server.client() as client:  # and it still serves
        assert client.get("/health").status_code == 200


def test_connections_over_the_cap_get_503_at_once(server: ServerThread) -> None:
    held = [connect(server) for _ in range(40)]
    try:
        server.wait_until(lambda: len(held) == 40, "connections open", 5)
        extra = connect(server)
        answer = read_until_closed(extra, limit_s=5)  # answered without sending anything
        extra.close()
    finally:
        for sock in held:
            sock.close()
    assert status_of(answer) == 503 and b"retry-after: 1" in answer.lower()
    assert b"MAX_CONNECTIONS=40" in answer


def test_an_idle_keep_alive_connection_is_closed(server: ServerThread) -> None:
    sock = connect(server)
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_until_closed(sock)  # the response, then the close after KEEPALIVE_TIMEOUT_S
    sock.close()
    assert status_of(answer) == 200


def test_an_early_413_closes_the_connection(server: ServerThread) -> None:
    sock = connect(server)
    sock.sendall(
        b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 99999999\r\n\r\n" + b'{"query": "q", "documents": ["'
    )
    answer = read_until_closed(sock)
    sock.close()
    assert status_of(answer) == 413 and b"connection: close" in answer.lower()


def test_a_malformed_chunked_body_is_a_4xx_with_one_log_line(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with server.client() as client:
        before = client.get("/metrics").json()
    sock = connect(server)
    sock.sendall(
        b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"que\r\nZZZ-not-a-chunk-size\r\n\r\n'
    )
    answer = read_until_closed(sock)
    sock.close()
    with server.client() as client:
        after = client.get("/metrics").json()
    assert 400 <= status_of(answer) < 500
    assert after["failed_requests"].get("internal_error", 0) == before["failed_requests"].get(
        "internal_error", 0
    )
    assert not any(record.exc_info for record in caplog.records), "no traceback for a client's error"


def slow_backend(seconds: float) -> FakeBackend:
    """A cross-encoder whose every batch takes ``seconds`` (a slow model, measured by the controller)."""

    def slow(batch: list[Encoded]) -> None:
        time.sleep(seconds)

    return FakeBackend(ModelKind.CROSS_ENCODER, fail_when=slow)


def test_a_small_request_rides_the_next_batch_while_four_big_ones_wait() -> None:
    backend = FakeBackend(ModelKind.CROSS_ENCODER)
    big = {"query": "q", "documents": [f"document {i} " + "word " * 60 for i in range(500)]}
    with (
        ServerThread(create_app(make_settings(batch_size=32, max_queue_size=8), backend=backend)) as server,
        server.client() as client,
        ThreadPoolExecutor(5) as pool,
    ):
        backend.batches.clear()
        backend.gate.clear()
        bigs = [pool.submit(client.post, "/rerank", json=big) for _ in range(4)]
        # One big batch runs (held); the four big requests wait with the rest of their items.
        server.wait_until(lambda: server.runtime.controller.queued == 4, "big requests queued", 30)
        small = pool.submit(client.post, "/rerank", json={"query": "q", "documents": ["tiny"]})
        server.wait_until(lambda: server.runtime.controller.queued == 5, "small request queued", 10)
        backend.gate.set()
        assert small.result().status_code == 200
        assert all(f.result().status_code == 200 for f in bigs)
    # The running big batch, then the small request's batch (it rides with big items of its length).
    assert any(len(item_lengths) and min(item_lengths) <= 3 for item_lengths in backend.batches[1:2]), [
        min(b) for b in backend.batches[:4]
    ]


def test_a_request_past_its_deadline_ends_at_the_deadline() -> None:
    backend = FakeBackend(ModelKind.CROSS_ENCODER)
    settings = make_settings(request_timeout_s=0.5)
    with ServerThread(create_app(settings, backend=backend)) as server, server.client() as client:
        backend.gate.clear()
        try:
            with ThreadPoolExecutor(1) as pool:
                blocker = pool.submit(client.post, "/rerank", json={"query": "q", "documents": ["a"]})
                server.wait_until(lambda: server.runtime.controller.in_flight == 1, "batch running", 10)
                started = time.monotonic()
                late = client.post("/rerank", json={"query": "q", "documents": ["b"]})
                elapsed = time.monotonic() - started
        finally:
            backend.gate.set()
        assert blocker.result().status_code == 504  # its batch hung: no progress for 0.5 s
    assert late.status_code == 504 and "REQUEST_TIMEOUT_S=0.5" in late.json()["error"]["message"]
    assert elapsed < 0.5 * 1.25 + 0.25  # at the deadline (not seconds later), loopback margin


def test_work_that_would_not_finish_is_refused_early_with_a_pointer_to_jobs() -> None:
    backend = slow_backend(0.05)  # 8 pairs per 0.05 s: about 160 pairs/s
    settings = make_settings(batch_size=8, max_request_seconds=1.0)
    with ServerThread(create_app(settings, backend=backend)) as server, server.client() as client:
        assert client.post("/rerank", json={"query": "q", "documents": ["d"] * 40}).status_code == 200
        runs_before = len(backend.batches)
        refused = client.post("/rerank", json={"query": "q", "documents": ["d"] * 800})
        assert len(backend.batches) == runs_before  # refused before any model work
    assert refused.status_code == 413
    message = refused.json()["error"]["message"]
    assert "MAX_REQUEST_SECONDS=1" in message and "/v1/jobs" in message


def test_rss_is_reported(server: ServerThread) -> None:
    with server.client() as client:
        metrics = client.get("/metrics").json()
        text = client.get("/metrics", params={"format": "prometheus"}).text
    assert metrics["rss_bytes"] > 10_000_000
    assert "process_resident_memory_bytes" in text


def test_a_job_cut_by_shutdown_is_failed_interrupted() -> None:
    backend = FakeBackend(ModelKind.BI_ENCODER)
    app = create_app(make_settings(batch_size=4), backend=backend)
    with ServerThread(app) as server, server.client() as client:
        backend.gate.clear()
        backend.batch_started.clear()
        chunks = [{"chunk_id": str(i), "content": f"text {i}"} for i in range(40)]
        body = {"type": "embed", "input": {"batch_id": "b", "chunks": chunks}}
        status_url = client.post("/v1/jobs", json=body).json()["status_url"]
        assert backend.batch_started.wait(10)
        loop = server.runtime.controller._batcher.get_loop()
        loop.call_soon_threadsafe(server.runtime.begin_drain)
        server.wait_until(lambda: server.runtime.status.value == "draining", "draining", 10)
        backend.gate.set()
        server.wait_until(lambda: client.get(status_url).json()["status"] == "FAILED", "job failed", 10)
        view = client.get(status_url).json()
    assert view["error"]["type"] == "interrupted"


def test_keep_alive_reuse_still_works(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert [client.get("/livez").status_code for _ in range(5)] == [200] * 5
