"""RunPod's serverless routes (/run, /runsync, /status/{id}, /cancel/{id}) on a real server.

Outputs are checked against /v1/jobs, the synchronous endpoints and in-process
sentence-transformers; the seed's own submit-then-poll client runs unchanged but for its
base URL (and with its ``Authorization: Bearer`` header, against a server that needs a key).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.redis_server import RedisServer
from tests.server import ServerThread

API_KEY = "runpod-test-key"
OTHER_KEY = "another-tenants-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHUNKS = [
    {"chunk_id": "a", "content": "Bones usually heal in six to eight weeks."},
    {"chunk_id": "b", "content": "The capital of France is Paris."},
    {"chunk_id": "c", "content": "Physical therapy helps recovery after a fracture."},
]
EMBED = {"batch_id": "repo-1", "chunks": CHUNKS}
RERANK = {
    "query": "how long does a fracture take to heal",
    "documents": [chunk["content"] for chunk in CHUNKS] + ["Bananas are rich in potassium."],
    "top_n": 3,
    "return_documents": True,
}
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")

# The seed's client (serverless migration plan, builder/handler.py), verbatim but for the
# trailing spaces of its blank lines: only the base URL "https://api.runpod.ai/v2/{EMBEDDER_ENDPOINT_ID}"
# is replaced, at run time, by this server's address.
SEED_CLIENT = '''
# NEW: Async job submission to embedder
async def call_embedder_serverless(batch_id: str, chunks: List[Dict]) -> Dict:
    """Submit embedding job to RunPod serverless and poll for completion."""

    # Submit job
    response = requests.post(
        f"https://api.runpod.ai/v2/{EMBEDDER_ENDPOINT_ID}/run",
        headers={"Authorization": f"Bearer {RUNPOD_API_KEY}"},
        json={
            "input": {
                "batch_id": batch_id,
                "chunks": chunks
            }
        }
    )
    job_id = response.json()["id"]

    # Poll for completion
    while True:
        status = requests.get(
            f"https://api.runpod.ai/v2/{EMBEDDER_ENDPOINT_ID}/status/{job_id}",
            headers={"Authorization": f"Bearer {RUNPOD_API_KEY}"}
        )
        result = status.json()

        if result["status"] == "COMPLETED":
            return result["output"]
        elif result["status"] == "FAILED":
            raise Exception(f"Embedding job failed: {result.get('error')}")

        await asyncio.sleep(0.5)  # Poll every 500ms
'''
SEED_BASE_URL = "https://api.runpod.ai/v2/{EMBEDDER_ENDPOINT_ID}"


def poll(client: httpx.Client, job_id: str, timeout_s: float = 300) -> list[dict[str, Any]]:
    """Every /status answer until the job is finished (polling the observable state)."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get(f"/status/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if seen[-1]["status"] in FINISHED:
            return seen
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} never finished")


def v1_job_output(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    accepted = client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]
    deadline = time.monotonic() + 300
    while (view := client.get(url).json())["status"] not in FINISHED:
        assert time.monotonic() < deadline, "the /v1/jobs job never finished"
        time.sleep(0.02)
    assert view["status"] == "COMPLETED", view
    return view["output"]


def vectors(output: dict[str, Any]) -> np.ndarray:
    return np.array([row["vector"] for row in output["vectors"]])


def ranking(output: dict[str, Any]) -> list[tuple[int, str]]:
    return [(row["index"], row["document"]["text"]) for row in output["results"]]


@pytest.fixture(scope="module")
def model_server() -> Iterator[ServerThread]:
    """The embedded model, behind API keys (the seed's client sends one)."""
    settings = make_settings(request_timeout_s=300, api_keys=f"{API_KEY},{OTHER_KEY}")
    with ServerThread(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(model_server: ServerThread) -> Iterator[httpx.Client]:
    with model_server.client(headers=AUTH) as keyed:
        yield keyed


def test_an_embed_job_from_run_answers_like_v1_jobs_embed_and_the_model(
    client: httpx.Client, sentence_transformer
) -> None:
    submitted = client.post("/run", json={"input": EMBED})
    assert submitted.status_code == 200, submitted.text
    assert submitted.json()["status"] in ("IN_QUEUE", "IN_PROGRESS") and set(submitted.json()) >= {"id"}
    history = poll(client, submitted.json()["id"])
    final = history[-1]
    assert {view["status"] for view in history} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert final["status"] == "COMPLETED" and final["id"] == submitted.json()["id"]
    assert final["delayTime"] >= 0 and final["executionTime"] >= 0 and "error" not in final
    output = final["output"]
    direct = client.post("/embed", json=EMBED).json()
    as_v1_job = v1_job_output(client, {"type": "embed", "input": EMBED})
    assert output["batch_id"] == "repo-1"
    assert [row["chunk_id"] for row in output["vectors"]] == ["a", "b", "c"]
    assert output["usage"] == direct["usage"] == as_v1_job["usage"]
    expected = sentence_transformer.encode([chunk["content"] for chunk in CHUNKS])
    np.testing.assert_allclose(vectors(output), expected, atol=1e-5)
    np.testing.assert_allclose(vectors(output), vectors(direct), atol=1e-6)
    np.testing.assert_allclose(vectors(output), vectors(as_v1_job), atol=1e-6)


def test_a_rerank_job_from_run_answers_like_v1_rerank(client: httpx.Client, sentence_transformer) -> None:
    submitted = client.post("/run", json={"input": RERANK})
    assert submitted.status_code == 200, submitted.text
    output = poll(client, submitted.json()["id"])[-1]["output"]
    direct = client.post("/v1/rerank", json=RERANK).json()
    as_v1_job = v1_job_output(client, {"type": "rerank", "input": RERANK})
    assert ranking(output) == ranking(direct) == ranking(as_v1_job)
    scores = [row["relevance_score"] for row in output["results"]]
    assert scores == pytest.approx([row["relevance_score"] for row in direct["results"]], abs=1e-5)
    assert scores == pytest.approx([row["relevance_score"] for row in as_v1_job["results"]], abs=1e-5)
    # The oracle: the model's own ordering of the documents by cosine similarity to the query.
    encoded = sentence_transformer.encode([RERANK["query"], *RERANK["documents"]], normalize_embeddings=True)
    best_first = np.argsort(-(encoded[1:] @ encoded[0]), kind="stable")[:3]
    assert [index for index, _ in ranking(output)] == best_first.tolist()


def test_runsync_answers_the_finished_job_at_once(client: httpx.Client) -> None:
    embedded = client.post("/runsync", json={"input": EMBED})
    reranked = client.post("/runsync", json={"input": RERANK})
    assert embedded.status_code == reranked.status_code == 200
    embedded, reranked = embedded.json(), reranked.json()
    assert embedded["status"] == reranked["status"] == "COMPLETED"
    direct = client.post("/embed", json=EMBED).json()
    np.testing.assert_allclose(vectors(embedded["output"]), vectors(direct), atol=1e-6)
    assert ranking(reranked["output"]) == ranking(client.post("/v1/rerank", json=RERANK).json())
    assert client.get(f"/status/{embedded['id']}").json() == embedded  # kept for /status too


def test_the_seed_client_loop_runs_unchanged_against_this_server(
    model_server: ServerThread, client: httpx.Client
) -> None:
    code = SEED_CLIENT.replace(SEED_BASE_URL, model_server.url)
    assert code.count(model_server.url) == 2  # both of its URLs, nothing else changed
    namespace: dict[str, Any] = {
        "requests": requests,
        "asyncio": asyncio,
        "Dict": dict,
        "List": list,
        "EMBEDDER_ENDPOINT_ID": "unused-here",
        "RUNPOD_API_KEY": API_KEY,
    }
    exec(compile(code, "seed_client", "exec"), namespace)
    output = asyncio.run(asyncio.wait_for(namespace["call_embedder_serverless"]("repo-1", CHUNKS), 300))
    direct = client.post("/embed", json=EMBED).json()
    assert [row["chunk_id"] for row in output["vectors"]] == ["a", "b", "c"]
    np.testing.assert_allclose(vectors(output), vectors(direct), atol=1e-6)


def test_every_route_needs_the_key(model_server: ServerThread, client: httpx.Client) -> None:
    job_id = client.post("/run", json={"input": EMBED}).json()["id"]
    poll(client, job_id)
    with model_server.client() as anonymous:
        answers = [
            anonymous.post("/run", json={"input": EMBED}),
            anonymous.post("/runsync", json={"input": EMBED}),
            anonymous.get(f"/status/{job_id}"),
            anonymous.post(f"/cancel/{job_id}"),
        ]
    assert [answer.status_code for answer in answers] == [401] * 4
    assert all(answer.json()["error"]["type"] == "unauthorized" for answer in answers)


def test_a_job_is_only_the_submitting_keys(model_server: ServerThread, client: httpx.Client) -> None:
    job_id = client.post("/run", json={"input": EMBED}).json()["id"]
    with model_server.client(headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
        answers = [other.get(f"/status/{job_id}"), other.post(f"/cancel/{job_id}")]
    assert [answer.status_code for answer in answers] == [404, 404]
    assert poll(client, job_id)[-1]["status"] == "COMPLETED"  # the other key's cancel did nothing


def test_unknown_ids_are_404(client: httpx.Client) -> None:
    for answer in (client.get("/status/no-such-job"), client.post("/cancel/no-such-job")):
        assert answer.status_code == 404
        assert answer.json()["error"]["type"] == "not_found"
        assert "no-such-job" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, 'expected {"input": {...}}'),
        ({"input": "embed these"}, 'expected {"input": {...}}'),
        ({"input": {"texts": ["a"]}}, "got the fields ['texts']"),
        ({"input": {"query": "q", "chunks": CHUNKS}}, "got the fields ['chunks', 'query']"),
        ({"input": {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": " "}]}}, "chunks.0"),
        ({"input": {"chunks": CHUNKS}}, "batch_id"),
        ({"input": {"query": "q", "documents": []}}, "documents"),
    ],
    ids=["empty", "not-an-object", "neither", "both", "empty-chunk", "no-batch-id", "no-documents"],
)
def test_an_input_of_neither_shape_is_a_422_saying_what_was_expected(
    client: httpx.Client, body: dict[str, Any], says: str
) -> None:
    for route in ("/run", "/runsync"):
        answer = client.post(route, json=body)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["type"] == "invalid_request" and says in error["message"]
        if "fields" in says:
            assert "embed input" in error["message"] and "rerank input" in error["message"]


def test_malformed_json_is_a_400(client: httpx.Client) -> None:
    answer = client.post("/run", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "malformed_request"


def chunks(count: int) -> list[dict[str, str]]:
    return [{"chunk_id": f"c{i}", "content": f"chunk {i} about topic {i % 7}"} for i in range(count)]


@pytest.fixture(scope="module")
def gated() -> Iterator[tuple[ServerThread, FakeBackend]]:
    """A fake model whose batches wait for the test (``gate``), and a short /runsync bound."""
    backend = FakeBackend(ModelKind.BI_ENCODER)
    settings = make_settings(batch_size=8, runsync_wait_s=0.5, max_active_jobs=8)
    with ServerThread(create_app(settings, backend=backend)) as server:
        yield server, backend
        backend.gate.set()


def test_runsync_gives_the_id_to_poll_once_its_wait_is_over(gated: tuple[ServerThread, FakeBackend]) -> None:
    server, backend = gated
    with server.client() as client:
        backend.gate.clear()
        waited = client.post("/runsync", json={"input": {"batch_id": "b", "chunks": chunks(20)}})
        assert waited.status_code == 200
        assert waited.json()["status"] in ("IN_QUEUE", "IN_PROGRESS") and "output" not in waited.json()
        backend.gate.set()
        final = poll(client, waited.json()["id"])[-1]
    assert final["status"] == "COMPLETED" and len(final["output"]["vectors"]) == 20


def test_cancel_a_queued_a_running_and_a_finished_job(gated: tuple[ServerThread, FakeBackend]) -> None:
    server, backend = gated
    with server.client() as client:
        done = client.post("/runsync", json={"input": {"batch_id": "d", "chunks": chunks(3)}}).json()
        assert done["status"] == "COMPLETED"
        backend.gate.clear()
        backend.batch_started.clear()
        running = client.post("/run", json={"input": {"batch_id": "r", "chunks": chunks(40)}}).json()
        assert backend.batch_started.wait(30)
        queued = client.post("/run", json={"input": {"batch_id": "q", "chunks": chunks(5)}}).json()
        assert client.get(f"/status/{queued['id']}").json()["status"] == "IN_QUEUE"
        cancelled_queued = client.post(f"/cancel/{queued['id']}").json()
        stopping = client.post(f"/cancel/{running['id']}").json()
        backend.gate.set()
        running_final = poll(client, running["id"])[-1]
        finished_again = client.post(f"/cancel/{done['id']}")
        still_there = client.get(f"/status/{done['id']}").json()
    assert cancelled_queued["status"] == "CANCELLED" and "delayTime" not in cancelled_queued
    assert stopping["status"] == "IN_PROGRESS"  # it stops before its next slice
    assert running_final["status"] == "CANCELLED" and "output" not in running_final
    assert finished_again.status_code == 200 and finished_again.json() == done  # left as it was
    assert still_there == done


def test_runsync_on_redis_answers_the_id_when_redis_is_lost_while_it_waits(tmp_path: Path) -> None:
    """The job was accepted: the client gets its id to poll, not an error it would answer by
    submitting the job twice."""
    backend = FakeBackend(ModelKind.BI_ENCODER)
    with RedisServer(tmp_path / "redis") as redis:
        settings = make_settings(
            batch_size=8, runsync_wait_s=120, job_backend="redis", redis_url=redis.url, redis_job_queue="rs"
        )
        server = ServerThread(create_app(settings, backend=backend))
        with server, server.client() as client, ThreadPoolExecutor(1) as pool:
            backend.gate.clear()
            backend.batch_started.clear()
            body = {"input": {"batch_id": "b", "chunks": chunks(40)}}
            waiting = pool.submit(client.post, "/runsync", json=body)
            assert backend.batch_started.wait(30)  # the job runs; /runsync waits for it
            redis.kill()
            answer = waiting.result(timeout=60)
            backend.gate.set()
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")  # as last read before the loss
    assert len(answer.json()["id"]) == 32 and "output" not in answer.json()
