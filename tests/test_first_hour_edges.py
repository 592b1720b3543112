"""The rough edges a new user met in their first hour: each fixed, each checked here.

A client's mistakes (404, 422) do not lower ``success_rate``; the server's failures do. A typo in
this server's own request shapes comes back as a warning (never silently dropped) while the vendor
dialects accept what their SDKs send. Messages name fields, not classes. A deleted job says it
was deleted. The batch memory budget is logged in GiB with where it comes from.
"""

from __future__ import annotations

import logging

import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.adaptive import BatchSizer
from tests.conftest import make_settings
from tests.redis_server import RedisServer
from tests.server import ServerThread


def test_client_errors_do_not_lower_the_success_rate_server_errors_do() -> None:
    failing = FakeBackend(
        ModelKind.CROSS_ENCODER, fail_when=lambda batch: RuntimeError("boom") if len(batch) == 3 else None
    )
    with ServerThread(create_app(make_settings(), backend=failing)) as server, server.client() as client:
        assert client.post("/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200
        assert client.post("/rerank", json={"query": "q"}).status_code == 422
        assert client.get("/v1/jobs/nope").status_code == 404
        clean = client.get("/metrics").json()
        assert client.post("/rerank", json={"query": "q", "documents": ["a", "b", "c"]}).status_code == 500
        after = client.get("/metrics").json()
    assert (clean["client_errors"], clean["server_errors"], clean["success_rate"]) == (2, 0, 1.0)
    assert (after["server_errors"], after["success_rate"]) == (1, 0.5)


def test_unknown_fields_of_our_own_shapes_are_warned_vendor_shapes_stay_quiet() -> None:
    app = create_app(make_settings(), backend=FakeBackend(ModelKind.CROSS_ENCODER))
    with ServerThread(app) as server, server.client() as client:
        ours = client.post("/rerank", json={"query": "q", "documents": ["a", "b"], "topn": 1}).json()
        cohere = client.post(
            "/v1/rerank", json={"query": "q", "documents": ["a"], "max_chunks_per_doc": 2, "x": 1}
        )
    assert ours["warnings"] == ["unknown field 'topn' ignored (did you mean 'top_n'?)"]
    assert len(ours["results"]) == 2  # ignored: top_n was not set
    assert cohere.status_code == 200 and "warnings" not in cohere.json().get("meta", {})


def test_embed_warns_of_unknown_fields() -> None:
    app = create_app(make_settings(), backend=FakeBackend(ModelKind.BI_ENCODER))
    with ServerThread(app) as server, server.client() as client:
        answer = client.post(
            "/embed",
            json={"batch_id": "b", "chunks": [{"chunk_id": "1", "content": "x"}], "normalise": False},
        ).json()
    assert answer["warnings"] == ["unknown field 'normalise' ignored (did you mean 'normalize'?)"]


def test_validation_messages_name_fields_not_classes() -> None:
    app = create_app(make_settings(), backend=FakeBackend(ModelKind.CROSS_ENCODER))
    with ServerThread(app) as server, server.client() as client:
        answers = [
            client.post("/v1/rerank", json=["not", "an", "object"]),
            client.post("/rerank", json={"query": "q", "documents": [{"text": "a"}]}),
        ]
    for answer in answers:
        assert answer.status_code == 422
        message = answer.json()["error"]["message"]
        assert "instance of" not in message and "Request" not in message, message


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_deleted_job_says_it_was_deleted(store: str, request: pytest.FixtureRequest) -> None:
    values: dict[str, object] = {}
    if store == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        values = {"job_backend": "redis", "redis_url": redis.url, "redis_job_queue": "deleted-jobs"}
    app = create_app(make_settings(**values), backend=FakeBackend(ModelKind.BI_ENCODER))
    with ServerThread(app) as server, server.client() as client:
        body = {"type": "embed", "input": {"batch_id": "b", "chunks": [{"chunk_id": "1", "content": "x"}]}}
        url = client.post("/v1/jobs", json=body).json()["status_url"]
        server.wait_until(lambda: client.get(url).json()["status"] == "COMPLETED", "the job")
        assert client.delete(url).status_code == 200
        gone = client.get(url)
        never = client.get("/v1/jobs/never-was")
    assert gone.status_code == 404 and "was deleted" in gone.json()["error"]["message"]
    assert never.status_code == 404 and "never submitted" in never.json()["error"]["message"]


def test_the_batch_memory_budget_is_logged_in_gib_with_its_source(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="reranker.engine.adaptive"):
        BatchSizer(32, 64, True, 3 * 2**30, memory_because="EMBEDDING_MAX_MEMORY_PERCENT=70 of 4.29 GiB")
    line = caplog.records[-1].getMessage()
    assert line.startswith(
        "Memory limit set to 3.00 GiB for batches (EMBEDDING_MAX_MEMORY_PERCENT=70 of 4.29 GiB)"
    )
    assert " GB" not in line
