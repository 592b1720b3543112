"""The model's declared prompts, applied as sentence-transformers applies them (issue 16 item 4):
checked over HTTP against ``SentenceTransformer.encode(prompt_name=...)``, ``encode_query`` and
``encode_document`` on a tiny e5-style model (``query: `` / ``passage: `` prompts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from tests.conftest import make_settings
from tests.families import E5_PROMPTS
from tests.server import ServerThread

TOLERANCE = 1e-4
QUERY = "how many people live in berlin"
DOCUMENTS = ["berlin has 3 million people", "hamburg has a large port", "rain today in paris"]


@pytest.fixture(scope="module")
def e5_path(family_model: Callable[[str], Path]) -> Path:
    return family_model("bert-prompts")


@pytest.fixture(scope="module")
def reference(e5_path: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(e5_path), device="cpu")


@pytest.fixture(scope="module")
def server(e5_path: Path) -> Iterator[ServerThread]:
    settings = make_settings(local_model_path=str(e5_path), enable_prediction_cache=True)
    with ServerThread(create_app(settings)) as running:
        yield running


def _openai(server: ServerThread, **options: object) -> np.ndarray:
    with server.client() as client:
        response = client.post("/v1/embeddings", json={"input": DOCUMENTS, **options})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def test_prompt_name_and_input_type_select_the_models_prompts(server: ServerThread, reference) -> None:
    plain = reference.encode(DOCUMENTS)
    as_query = reference.encode(DOCUMENTS, prompt_name="query")
    as_document = reference.encode(DOCUMENTS, prompt_name="document")
    assert np.abs(as_query - plain).max() > 100 * TOLERANCE  # the prompt changes the vectors
    np.testing.assert_allclose(_openai(server), plain, atol=TOLERANCE)
    np.testing.assert_allclose(_openai(server, prompt_name="query"), as_query, atol=TOLERANCE)
    np.testing.assert_allclose(_openai(server, input_type="search_query"), as_query, atol=TOLERANCE)
    np.testing.assert_allclose(_openai(server, input_type="query"), as_query, atol=TOLERANCE)
    np.testing.assert_allclose(_openai(server, input_type="search_document"), as_document, atol=TOLERANCE)
    np.testing.assert_allclose(
        reference.encode_document(DOCUMENTS), as_document, atol=1e-6
    )  # the document role is encode_document's prompt
    with server.client() as client:
        chunks = [{"chunk_id": str(i), "content": text} for i, text in enumerate(DOCUMENTS)]
        embed = client.post("/embed", json={"batch_id": "b", "chunks": chunks, "prompt_name": "query"})
    assert embed.status_code == 200, embed.text
    vectors = np.array([item["vector"] for item in embed.json()["vectors"]])
    np.testing.assert_allclose(vectors, as_query, atol=TOLERANCE)


def test_the_prediction_cache_keeps_prompts_apart(server: ServerThread, reference) -> None:
    """The same text asked with and without a prompt: the cache must answer each with its own vector."""
    first = _openai(server, prompt_name="query")
    second = _openai(server)  # the same texts, no prompt: must not be the cached query vectors
    np.testing.assert_allclose(first, reference.encode(DOCUMENTS, prompt_name="query"), atol=TOLERANCE)
    np.testing.assert_allclose(second, reference.encode(DOCUMENTS), atol=TOLERANCE)


def test_an_unknown_prompt_is_a_422_listing_the_models_prompts(server: ServerThread) -> None:
    with server.client() as client:
        unknown = client.post("/v1/embeddings", json={"input": "x", "prompt_name": "classification"})
        unknown_type = client.post("/v1/embeddings", json={"input": "x", "input_type": "clustering"})
        task = client.post("/v1/embeddings", json={"input": "x", "task": "retrieval.query"})
        instruction = client.post(
            "/embed",
            json={"batch_id": "b", "chunks": [{"chunk_id": "1", "content": "x"}], "instruction": "y"},
        )
        health = client.get("/health").json()["model"]
    for response in (task, instruction):  # not silently dropped: they would change the vectors
        assert response.status_code == 422 and "prompt_name" in response.json()["error"]["message"]
    for response, field in ((unknown, "prompt_name"), (unknown_type, "input_type")):
        assert response.status_code == 422
        message = response.json()["error"]["message"]
        assert field in message and "'query'" in message and "'document'" in message, message
    assert health["prompts"] == E5_PROMPTS


def test_rerank_on_a_bi_encoder_uses_the_query_and_document_prompts(server: ServerThread, reference) -> None:
    query = reference.encode_query([QUERY], normalize_embeddings=True)[0]
    documents = reference.encode_document(DOCUMENTS, normalize_embeddings=True)
    want = documents @ query
    plain = (
        reference.encode(DOCUMENTS, normalize_embeddings=True)
        @ reference.encode([QUERY], normalize_embeddings=True)[0]
    )
    assert np.abs(want - plain).max() > 100 * TOLERANCE
    with server.client() as client:
        response = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
        refused = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "instruction": "x"})
    got = np.zeros(len(DOCUMENTS))
    for result in response.json()["results"]:
        got[result["index"]] = result["relevance_score"]
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    assert refused.status_code == 422 and "instruction" in refused.json()["error"]["message"]


def test_default_prompt_name_applies_to_requests_without_one(e5_path: Path, reference) -> None:
    settings = make_settings(local_model_path=str(e5_path), default_prompt_name="query")
    with ServerThread(create_app(settings)) as server:
        vectors = _openai(server)
        health = server.client().get("/health").json()["model"]
    np.testing.assert_allclose(vectors, reference.encode(DOCUMENTS, prompt_name="query"), atol=TOLERANCE)
    assert health["default_prompt_name"] == "query"


def test_an_unknown_default_prompt_name_fails_start_up(e5_path: Path) -> None:
    settings = make_settings(local_model_path=str(e5_path), default_prompt_name="nope")
    server = ServerThread(create_app(settings)).start()
    try:
        assert server.runtime.status.value == "unhealthy"
        assert "DEFAULT_PROMPT_NAME='nope'" in server.runtime.error and "query" in server.runtime.error
    finally:
        server.stop()


def test_every_window_of_a_long_document_carries_the_document_prompt(server: ServerThread, reference) -> None:
    """A document longer than the model window is scored by its best window, and each window is a
    passage as the model expects it: ``passage: `` + a slice of the document."""
    import torch

    document = "the weather is cold and the wind is warm today " * 60 + "berlin has 3 million people"
    with server.client() as client:
        body = {"query": QUERY, "documents": [document], "return_details": True}
        result = client.post("/v1/rerank", json=body).json()["results"][0]
    backend = server.runtime.backend
    windows = backend.text_windows([document], 32, 10, None, E5_PROMPTS["document"])[0].items
    prompt_ids = reference.tokenizer(E5_PROMPTS["document"], add_special_tokens=False)["input_ids"]
    assert result["details"]["windows"] == len(windows) > 1
    assert all(list(w.ids[1 : 1 + len(prompt_ids)]) == prompt_ids for w in windows)
    query = reference.encode_query([QUERY], normalize_embeddings=True)[0]
    with torch.no_grad():
        vectors = [
            reference(
                {
                    "input_ids": torch.tensor([list(w.ids)]),
                    "token_type_ids": torch.zeros(1, len(w), dtype=torch.long),
                    "attention_mask": torch.ones(1, len(w), dtype=torch.long),
                }
            )["sentence_embedding"][0].numpy()
            for w in windows
        ]
    best = max(float(v @ query / np.linalg.norm(v)) for v in vectors)
    assert result["relevance_score"] == pytest.approx(best, abs=TOLERANCE)


def test_an_embed_job_applies_the_prompt_its_submission_chose(server: ServerThread, reference) -> None:
    """Jobs take prompt_name / input_type like /embed (resolved at submission: unknown is a 422)."""
    from tests.test_jobs import follow

    chunks = [{"chunk_id": str(i), "content": text} for i, text in enumerate(DOCUMENTS)]
    with server.client() as client:
        unknown = client.post(
            "/v1/jobs",
            json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks, "prompt_name": "nope"}},
        )
        submitted = client.post(
            "/v1/jobs",
            json={
                "type": "embed",
                "input": {"batch_id": "b", "chunks": chunks, "input_type": "search_query"},
            },
        )
        assert submitted.status_code == 202, submitted.text
        finished = follow(client, submitted.json()["job_id"])[-1]
    assert unknown.status_code == 422 and "'query'" in unknown.json()["error"]["message"]
    assert finished["status"] == "COMPLETED", finished
    vectors = np.array([item["vector"] for item in finished["output"]["vectors"]])
    np.testing.assert_allclose(vectors, reference.encode(DOCUMENTS, prompt_name="query"), atol=TOLERANCE)


def test_a_rerank_job_checks_document_length_with_the_document_prompt(server: ServerThread) -> None:
    """truncate "NONE" at submission: a document that fits alone but not behind ``passage: `` (how the
    model sees it) is a 422 then, not a job that fails after the work before it."""
    backend = server.runtime.backend
    words = ["berlin"]
    while not backend.tokenize_texts([E5_PROMPTS["document"] + " ".join(words)])[0].truncated:
        words.append("berlin")
    document = " ".join(words)
    assert not backend.tokenize_texts([document])[0].truncated  # fits without the prompt
    job = {"query": QUERY, "documents": [DOCUMENTS[0], document], "truncate": "NONE"}
    with server.client() as client:
        refused = client.post("/v1/jobs", json={"type": "rerank", "input": job})
    assert refused.status_code == 422, refused.text
    assert "input.documents.1" in refused.json()["error"]["message"]


def test_without_query_or_document_prompts_rerank_uses_none_as_sentence_transformers_does(
    e5_path: Path, tmp_path: Path
) -> None:
    """sentence-transformers 6 gives every model empty "query" and "document" prompts, so
    ``encode_query``/``encode_document`` of a model with only a default prompt apply no prompt (plain
    ``encode`` applies the default): rerank on such a model must do the same."""
    import json
    import shutil

    from sentence_transformers import SentenceTransformer

    path = tmp_path / "default-only"
    shutil.copytree(e5_path, path)
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    config |= {"prompts": {"retrieval": "represent for retrieval: "}, "default_prompt_name": "retrieval"}
    (path / "config_sentence_transformers.json").write_text(json.dumps(config))
    reference = SentenceTransformer(str(path), device="cpu")
    query = reference.encode_query([QUERY], normalize_embeddings=True)[0]
    want = reference.encode_document(DOCUMENTS, normalize_embeddings=True) @ query
    bare = SentenceTransformer(str(e5_path), device="cpu", prompts={})
    plain = (
        bare.encode(DOCUMENTS, normalize_embeddings=True) @ bare.encode([QUERY], normalize_embeddings=True)[0]
    )
    np.testing.assert_allclose(want, plain, atol=1e-6)  # no fallback to the default prompt...
    assert (
        np.abs(reference.encode(DOCUMENTS) - bare.encode(DOCUMENTS)).max() > 100 * TOLERANCE
    )  # ...which encode applies
    with ServerThread(create_app(make_settings(local_model_path=str(path)))) as server:
        response = server.client().post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    got = np.zeros(len(DOCUMENTS))
    for result in response.json()["results"]:
        got[result["index"]] = result["relevance_score"]
    np.testing.assert_allclose(got, want, atol=TOLERANCE)


def test_infinity_embeddings_honour_prompt_name_and_input_type(server: ServerThread, reference) -> None:
    """Issue 22: /infinity/embeddings dropped prompt_name and input_type (and so a prompt) silently."""
    as_query = reference.encode(DOCUMENTS, prompt_name="query")
    with server.client() as client:
        by_name = client.post("/infinity/embeddings", json={"input": DOCUMENTS, "prompt_name": "query"})
        by_type = client.post("/infinity/embeddings", json={"input": DOCUMENTS, "input_type": "search_query"})
        unknown = client.post("/infinity/embeddings", json={"input": DOCUMENTS, "prompt_name": "nope"})
    for response in (by_name, by_type):
        assert response.status_code == 200, response.text
        got = np.array([item["embedding"] for item in response.json()["data"]])
        np.testing.assert_allclose(got, as_query, atol=TOLERANCE)
    assert unknown.status_code == 422
    assert "prompt_name" in unknown.json()["error"]["message"], unknown.text
