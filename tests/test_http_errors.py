"""Bad input and overload over real HTTP (uvicorn on a free port) with the fake backend."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.server import ServerThread

LIMITS = {"max_documents_per_request": 5, "max_text_chars": 100, "max_request_bytes": 4096}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ServerThread]:
    app = create_app(make_settings(**LIMITS, max_queue_size=2), backend=FakeBackend(ModelKind.CROSS_ENCODER))
    with ServerThread(app) as server:
        yield server


def assert_error(response: httpx.Response, status: int, error_type: str, *needles: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    for needle in needles:
        assert needle in error["message"], error["message"]


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"query": "", "documents": ["a"]}, ["query", "empty"]),
        ({"query": "   ", "documents": ["a"]}, ["query", "empty"]),
        ({"documents": ["a"]}, ["query", "Field required"]),
        ({"query": "q", "documents": []}, ["documents"]),
        ({"query": "q", "documents": ["a", 3]}, ["documents.1", "string"]),
        ({"query": "q", "documents": ["a", ""]}, ["documents", "document 1 is empty"]),
        ({"query": "q", "documents": "not a list"}, ["documents"]),
        ({"query": "q", "documents": ["a"], "top_k": 0}, ["top_k"]),
        ({"query": "q", "documents": ["a"], "top_k": -3}, ["top_k"]),
        ({"query": "q", "documents": ["d"] * 6}, ["documents", "MAX_DOCUMENTS_PER_REQUEST=5"]),
        (["query", "documents"], ["body"]),
    ],
)
def test_rerank_schema_violations_are_422_naming_the_field(
    fake_server: ServerThread, body: object, needles: list[str]
) -> None:
    with fake_server.client() as client:
        assert_error(client.post("/rerank", json=body), 422, "invalid_request", *needles)


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"query": "q", "documents": ["a"], "top_n": 0}, ["top_n"]),
        ({"query": "q", "documents": [{"title": "no text"}]}, ["documents.0", "text"]),
        ({"query": "q", "documents": [{"text": 5}]}, ["documents.0"]),
        ({"query": "q", "documents": [{"t": 5}], "rank_fields": ["t"]}, ["documents.0.t"]),
        ({"query": "q", "documents": [7]}, ["documents.0"]),
        ({"query": "q" * 101, "documents": ["a"], "truncate": "NONE"}, ["query", "MAX_TEXT_CHARS=100"]),
        (
            {"query": "q", "documents": ["a", "d" * 101], "truncate": "NONE"},
            ["documents.1", "MAX_TEXT_CHARS=100"],
        ),
    ],
)
def test_v1_rerank_schema_violations_are_422(
    fake_server: ServerThread, body: object, needles: list[str]
) -> None:
    with fake_server.client() as client:
        assert_error(client.post("/v1/rerank", json=body), 422, "invalid_request", *needles)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"\xff\xfe", b'{"query": "q", "documents": ["a"]'])
def test_malformed_json_is_400(fake_server: ServerThread, raw: bytes) -> None:
    with fake_server.client() as client:
        response = client.post("/rerank", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "malformed_request")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_that_is_not_declared_json_is_415_saying_what_to_send(
    fake_server: ServerThread, content_type: str
) -> None:
    body = b'{"query": "q", "documents": ["a"]}'
    with fake_server.client() as client:
        for path in ("/rerank", "/v1/rerank", "/v1/embeddings"):
            response = client.post(path, content=body, headers={"content-type": content_type})
            assert_error(
                response, 415, "unsupported_media_type", content_type, "Content-Type: application/json"
            )


@pytest.mark.parametrize(
    "content_type", [None, "application/json", "application/json; charset=utf-8", "application/vnd.api+json"]
)
def test_json_or_no_content_type_is_read_as_json(fake_server: ServerThread, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    with fake_server.client() as client:
        response = client.post("/rerank", content=b'{"query": "q", "documents": ["a"]}', headers=headers)
    assert response.status_code == 200, response.text


def test_body_over_the_limit_is_413(fake_server: ServerThread) -> None:
    body = {"query": "q", "documents": ["x" * 90] * 60}
    with fake_server.client() as client:
        assert_error(client.post("/rerank", json=body), 413, "payload_too_large", "MAX_REQUEST_BYTES=4096")


def test_chunked_body_over_the_limit_is_413(fake_server: ServerThread) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"query": "q", "documents": ['
        for _ in range(100):
            yield b'"' + b"y" * 80 + b'",'
        yield b'"z"]}'

    with fake_server.client() as client:
        assert_error(
            client.post("/rerank", content=chunks()), 413, "payload_too_large", "MAX_REQUEST_BYTES=4096"
        )


def test_unknown_route_is_404_and_wrong_method_405(fake_server: ServerThread) -> None:
    with fake_server.client() as client:
        assert_error(client.get("/nope"), 404, "not_found", "/nope")
        assert_error(client.get("/rerank"), 405, "method_not_allowed")


def test_server_keeps_serving_after_bad_input(fake_server: ServerThread) -> None:
    with fake_server.client() as client:
        for raw in (b"{", b"[]", b'{"query": null}'):
            client.post("/rerank", content=raw)
        good = client.post("/rerank", json={"query": "apple pie", "documents": ["apple pie recipe", "car"]})
    assert good.status_code == 200
    assert [r["index"] for r in good.json()["results"]] == [0, 1]


def test_full_queue_gets_503_with_retry_after_and_admitted_requests_finish() -> None:
    backend = FakeBackend(ModelKind.CROSS_ENCODER)
    app = create_app(make_settings(max_queue_size=2, batch_size=1), backend=backend)
    body = {"query": "q", "documents": ["a"]}
    with ServerThread(app) as server, concurrent.futures.ThreadPoolExecutor(4) as pool:
        backend.gate.clear()
        backend.batch_started.clear()
        with server.client() as client:
            first = pool.submit(client.post, "/rerank", json=body)
            assert backend.batch_started.wait(10)  # the first request is inside the model
            waiting = [pool.submit(client.post, "/rerank", json=body) for _ in range(2)]
            server.wait_until(lambda: server.runtime.controller.queued == 2, "two queued requests", 10)
            refused = client.post("/rerank", json=body)
            assert_error(refused, 503, "overloaded", "queue full")
            assert int(refused.headers["retry-after"]) >= 1
            health = client.get("/health").json()["controller"]
            assert (health["queued"], health["in_flight"]) == (2, 1)
            backend.gate.set()
            assert [f.result().status_code for f in (first, *waiting)] == [200, 200, 200]
            metrics = client.get("/metrics").json()
    assert metrics["rejected_requests"] == 1
    assert metrics["successful_requests"] == 3
    assert metrics["failed_requests"] == {"overloaded": 1}


def test_client_that_disconnects_while_queued_costs_no_compute() -> None:
    import socket

    backend = FakeBackend(ModelKind.CROSS_ENCODER)
    app = create_app(make_settings(batch_size=1), backend=backend)
    with ServerThread(app) as server, concurrent.futures.ThreadPoolExecutor(1) as pool:
        backend.gate.clear()
        backend.batch_started.clear()
        backend.batches.clear()  # forget the warm-up pass
        with server.client() as client:
            first = pool.submit(client.post, "/rerank", json={"query": "q", "documents": ["a"]})
            assert backend.batch_started.wait(10)
            payload = b'{"query": "gone", "documents": ["one two three", "four five"]}'
            raw = socket.create_connection(("127.0.0.1", server.port))
            raw.sendall(
                b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            server.wait_until(lambda: server.runtime.controller.queued == 1, "queued", 10)
            raw.close()
            server.wait_until(lambda: server.runtime.controller.queued == 0, "dropped", 10)
            backend.gate.set()
            assert first.result().status_code == 200
            metrics = client.get("/metrics").json()
    assert backend.batches == [[2]]  # only the first request's pair reached the model
    assert metrics["failed_requests"] == {}  # the client's doing, not a failure of the server
    assert metrics["client_disconnects"] == 1


def test_a_client_that_abandons_its_upload_is_a_disconnect_not_a_server_error(
    fake_server: ServerThread,
) -> None:
    with fake_server.client() as client:
        before = client.get("/metrics").json()
        raw = socket.create_connection(("127.0.0.1", fake_server.port))
        raw.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"query": "half a body'
        )
        raw.close()
        fake_server.wait_until(
            lambda: client.get("/metrics").json()["client_disconnects"] > before["client_disconnects"],
            "disconnect counted",
            10,
        )
        after = client.get("/metrics").json()
    assert after["failed_requests"].get("internal_error", 0) == before["failed_requests"].get(
        "internal_error", 0
    )
    assert after["client_disconnects"] == before["client_disconnects"] + 1


class LargeLogits(FakeBackend):
    """A cross-encoder whose logits are 18, 25 and 30: float32 sigmoid rounds all to 1.0."""

    def forward(self, batch):  # type: ignore[override]
        return np.array([{"low": 18.0, "mid": 25.0, "high": 30.0}[word] for word in self._words(batch)], "f4")

    def _words(self, batch):
        ids = {self._encode(word, 1)[0][0]: word for word in ("low", "mid", "high")}
        return [ids.get(item.ids[-1], "low") for item in batch]  # "low" for the warm-up probe


def test_ranking_uses_raw_logits_where_sigmoid_scores_tie_at_one() -> None:
    backend = LargeLogits(ModelKind.CROSS_ENCODER)
    with ServerThread(create_app(make_settings(), backend=backend)) as server, server.client() as client:
        body = {"query": "q", "documents": ["low", "mid", "high"]}
        native = client.post("/rerank", json=body).json()["results"]
        cohere = client.post("/v1/rerank", json=body).json()["results"]
    assert [r["score"] for r in native] == [1.0, 1.0, 1.0]
    assert [r["index"] for r in native] == [2, 1, 0]  # by logit, not request order
    assert [r["index"] for r in cohere] == [2, 1, 0]


class _Connection:
    """The ``receive`` of a request whose body was read: it returns once the client goes."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, str]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_the_disconnect_watch_tells_a_gone_client_from_a_server_that_stops() -> None:
    """A disconnect alone ends the work as a 499; a cancellation from outside (uvicorn stopping a
    request task) stays a cancellation, also when the client goes in the same turn; a result the
    work had before either is returned; the task is left with no cancellation pending."""
    from reranker.api.body import unless_disconnected
    from reranker.errors import ClientDisconnectedError

    async def run(disconnect: bool, cancel_from_outside: bool) -> tuple[str, int]:
        connection = _Connection()
        started = asyncio.Event()

        async def work() -> str:
            started.set()
            await asyncio.sleep(30)
            return "answer"

        async def serve() -> tuple[str, int]:
            try:
                outcome = await unless_disconnected(connection, work())  # type: ignore[arg-type]
            except ClientDisconnectedError:
                outcome = "499"
            task = asyncio.current_task()
            assert task is not None
            return outcome, task.cancelling()

        task = asyncio.get_running_loop().create_task(serve())
        await started.wait()
        if disconnect:
            connection.gone.set()
        if cancel_from_outside:
            task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled", 0

    async def quick() -> str:
        return "ready"

    async def at_once() -> str:
        return await unless_disconnected(_Connection(), quick())  # type: ignore[arg-type]

    assert asyncio.run(run(disconnect=True, cancel_from_outside=False)) == ("499", 0)
    assert asyncio.run(run(disconnect=False, cancel_from_outside=True)) == ("cancelled", 0)
    assert asyncio.run(run(disconnect=True, cancel_from_outside=True)) == ("cancelled", 0)
    assert asyncio.run(at_once()) == "ready"
