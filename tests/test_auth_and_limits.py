"""API keys (401 unless the right Bearer key; probes open) and each request limit's error."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import cohere
import pytest

from reranker.api.app import create_app
from reranker.api.auth import ApiKeys
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.errors import StartupError
from tests.conftest import make_settings
from tests.server import ServerThread

RERANK = {"query": "apple", "documents": ["apple pie", "car"]}


def keyed_server(**settings: object) -> ServerThread:
    return ServerThread(create_app(make_settings(**settings), backend=FakeBackend(ModelKind.CROSS_ENCODER)))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with keyed_server(api_keys="first-key, second-key") as running:
        yield running


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers", [{}, bearer("wrong"), bearer("first-key-but-longer"), {"authorization": "first-key"}]
)
def test_inference_without_the_right_key_is_401(server: ServerThread, headers: dict[str, str]) -> None:
    with server.client() as client:
        for path, body in (("/rerank", RERANK), ("/v1/rerank", RERANK), ("/v1/embeddings", {"input": "x"})):
            response = client.post(path, json=body, headers=headers)
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"]["type"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"


def test_either_key_is_accepted_and_probes_stay_open(server: ServerThread) -> None:
    with server.client() as client:
        for key in ("first-key", "second-key"):
            assert client.post("/rerank", json=RERANK, headers=bearer(key)).status_code == 200
        for path in ("/health", "/livez", "/readyz", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_the_cohere_sdk_sends_its_key_as_a_bearer_token(server: ServerThread) -> None:
    good = cohere.Client(base_url=server.url, api_key="second-key")
    assert [
        r.index for r in good.rerank(model="m", query="apple", documents=["apple pie", "car"]).results
    ] == [0, 1]
    with pytest.raises(cohere.core.ApiError) as refused:
        cohere.Client(base_url=server.url, api_key="nope").rerank(model="m", query="q", documents=["d"])
    assert refused.value.status_code == 401


def test_protect_metrics_closes_metrics_but_not_health() -> None:
    with keyed_server(api_keys="k", protect_metrics=True) as running, running.client() as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", params={"format": "prometheus"}).status_code == 401
        assert client.get("/metrics", headers=bearer("k")).status_code == 200
        assert client.get("/health").status_code == 200


def test_keys_file_with_comments(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-11\nfrom-file\n\n")
    with keyed_server(api_keys_file=str(keys)) as running, running.client() as client:
        assert client.post("/rerank", json=RERANK, headers=bearer("from-file")).status_code == 200
        assert client.post("/rerank", json=RERANK, headers=bearer("# rotated 2026-11")).status_code == 401


@pytest.mark.parametrize(
    ("content", "message"), [(None, "cannot read"), ("# only a comment\n", "holds no key")]
)
def test_a_missing_or_empty_keys_file_stops_start_up(
    tmp_path: Path, content: str | None, message: str
) -> None:
    keys = tmp_path / "keys"
    if content is not None:
        keys.write_text(content)
    with pytest.raises(StartupError, match=message):
        create_app(make_settings(api_keys_file=str(keys)), backend=FakeBackend(ModelKind.CROSS_ENCODER))


def test_key_comparison_needs_the_whole_key() -> None:
    keys = ApiKeys(["abc", "def"])
    assert keys.accepts("abc") and keys.accepts("def")
    assert not any(keys.accepts(k) for k in ("ab", "abcd", "ABC", "", "abc "))


# ---- limits: each refused with its limit named, before any model work --------------------------


LIMITS = {
    "max_documents_per_request": 5,
    "max_text_chars": 100,
    "max_request_bytes": 4096,
    "max_texts_per_embed_request": 3,
    "body_read_timeout_s": 0.5,
}


@pytest.fixture(scope="module")
def limited() -> Iterator[tuple[ServerThread, FakeBackend]]:
    backend = FakeBackend(ModelKind.BI_ENCODER)
    with ServerThread(create_app(make_settings(**LIMITS), backend=backend)) as running:
        yield running, backend


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/rerank", {"query": "q", "documents": ["d"] * 6}, 422, "MAX_DOCUMENTS_PER_REQUEST=5"),
        ("/v1/rerank", {"query": "q", "documents": ["d"] * 6}, 422, "MAX_DOCUMENTS_PER_REQUEST=5"),
        (
            "/v1/rerank",
            {"query": "q" * 101, "documents": ["d"], "truncate": "NONE"},
            422,
            "MAX_TEXT_CHARS=100",
        ),
        (
            "/v1/rerank",
            {"query": "q", "documents": ["d" * 101], "truncate": "NONE"},
            422,
            "MAX_TEXT_CHARS=100",
        ),
        (
            "/rerank",
            {"query": "q", "documents": ["d"], "top_k": 6},
            422,
            "top_k: 6 is over MAX_DOCUMENTS_PER_REQUEST=5",
        ),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 10**9}, 422, "top_n: 1000000000 is over"),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, 422, "top_n"),
        ("/v1/embeddings", {"input": ["a"] * 4}, 413, "MAX_TEXTS_PER_EMBED_REQUEST=3"),
        (
            "/embed",
            {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "x" * 101}], "truncate": False},
            422,
            "MAX_TEXT_CHARS=100",
        ),
        (
            "/embed",
            {"batch_id": "b", "chunks": [{"chunk_id": str(i), "content": "c"} for i in range(4)]},
            413,
            "=3",
        ),
        ("/rerank", {"query": "q", "documents": ["x" * 90] * 50}, 413, "MAX_REQUEST_BYTES=4096"),
    ],
)
def test_each_limit_is_refused_with_the_limit_named_before_model_work(
    limited: tuple[ServerThread, FakeBackend], path: str, body: dict, status: int, needle: str
) -> None:
    server, backend = limited
    before = len(backend.batches)
    with server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert len(backend.batches) == before


def test_a_half_sent_body_gets_408_and_the_server_serves_others(
    limited: tuple[ServerThread, FakeBackend],
) -> None:
    server, _ = limited
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
        stalled.sendall(
            b"POST /rerank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 200\r\n\r\n{"query": "q", "documents": ['
        )
        with server.client() as client:  # another client is not held up meanwhile
            assert client.post("/rerank", json=RERANK).status_code == 200
        answer = stalled.recv(65536).decode()  # the server answers once BODY_READ_TIMEOUT_S has passed
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 408"), head
    assert "BODY_READ_TIMEOUT_S=0.5" in body and '"body_timeout"' in body


def test_request_ids_are_echoed_or_made(limited: tuple[ServerThread, FakeBackend]) -> None:
    server, _ = limited
    with server.client() as client:
        given = client.post("/rerank", json=RERANK, headers={"x-request-id": "trace-42.a:b"})
        made = client.post("/rerank", json=RERANK)
        unsafe = client.get("/livez", headers={"x-request-id": "bad id\twith spaces"})
    assert given.headers["x-request-id"] == "trace-42.a:b"
    assert (
        len(made.headers["x-request-id"]) == 32
        and made.headers["x-request-id"] != given.headers["x-request-id"]
    )
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
