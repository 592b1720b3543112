"""infinity-client (Infinity's generated client) against ``/infinity``, the model list for it and
for the OpenAI SDK, and ``null`` accepted for every optional request field of every operation of
/openapi.json (what langchain-cohere and other SDKs send for what their caller left unset)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.api.openapi import openapi_document
from tests.client_texts import BEST, DOCUMENTS, QUERY
from tests.conftest import make_settings
from tests.server import ServerThread


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings())) as running:
        yield running


def test_infinity_client_rerank(server: ServerThread) -> None:
    from infinity_client import Client
    from infinity_client.api.default import rerank
    from infinity_client.models import RerankInput, ReRankResult

    client = Client(base_url=server.url + "/infinity", raise_on_unexpected_status=True)
    result = rerank.sync(
        client=client, body=RerankInput(query=QUERY, documents=DOCUMENTS, return_documents=True)
    )
    assert isinstance(result, ReRankResult), result
    assert result.results[0].index == BEST and result.results[0].document == DOCUMENTS[BEST]
    scores = [item.relevance_score for item in result.results]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert result.model == "all-MiniLM-L6-v2" and result.usage.prompt_tokens > 0

    top = rerank.sync(client=client, body=RerankInput(query=QUERY, documents=DOCUMENTS, top_n=1))
    assert isinstance(top, ReRankResult) and [item.index for item in top.results] == [BEST]


def test_infinity_options_of_other_dialects_are_not_dropped(server: ServerThread) -> None:
    """Issue 22: an instruction or a prompt the model does not have is a 422 naming the field, as on
    /v1/rerank and /v1/embeddings, not ignored (they would change the scores or vectors)."""
    with server.client() as client:
        instruction = client.post(
            "/infinity/rerank", json={"query": QUERY, "documents": DOCUMENTS, "instruction": "x"}
        )
        prompt = client.post("/infinity/embeddings", json={"input": DOCUMENTS, "prompt_name": "query"})
        kind = client.post("/infinity/embeddings", json={"input": DOCUMENTS, "input_type": "clustering"})
    for response, field in ((instruction, "instruction"), (prompt, "prompt_name"), (kind, "input_type")):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request" and field in error["message"], error


def test_infinity_client_embeddings(server: ServerThread) -> None:
    from infinity_client import Client
    from infinity_client.api.default import embeddings
    from infinity_client.models import OpenAIEmbeddingInputText, OpenAIEmbeddingResult

    client = Client(base_url=server.url + "/infinity", raise_on_unexpected_status=True)
    result = embeddings.sync(client=client, body=OpenAIEmbeddingInputText(input_=DOCUMENTS))
    assert isinstance(result, OpenAIEmbeddingResult), result
    vectors = np.array([item.embedding for item in sorted(result.data, key=lambda item: item.index)])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with server.client() as http:
        chunks = [{"chunk_id": str(i), "content": text} for i, text in enumerate(DOCUMENTS)]
        own = http.post("/embed", json={"batch_id": "b", "chunks": chunks}).json()["vectors"]
    np.testing.assert_allclose(vectors, [item["vector"] for item in own], atol=1e-6)


def test_infinity_client_models(server: ServerThread) -> None:
    from infinity_client import Client
    from infinity_client.api.default import models
    from infinity_client.models import OpenAIModelInfo

    listing = models.sync(client=Client(base_url=server.url + "/infinity", raise_on_unexpected_status=True))
    assert isinstance(listing, OpenAIModelInfo)
    assert [model.id for model in listing.data] == ["all-MiniLM-L6-v2"]
    assert listing.data[0].capabilities == ["rerank", "embed"]


def test_openai_models_list_and_plain_models(server: ServerThread) -> None:
    from openai import OpenAI

    listed = OpenAI(base_url=server.url + "/v1", api_key="unused").models.list()
    [model] = listed.data
    assert model.id == "all-MiniLM-L6-v2" and model.owned_by == "reranker"
    with server.client() as client:
        plain = client.get("/models").json()["data"][0]
    assert plain["kind"] == "bi-encoder" and plain["dimension"] == 384 and plain["max_input_length"] == 256
    assert plain["limits"]["max_documents_per_request"] == 1000


def test_langchain_cohere_body_with_nulls(server: ServerThread) -> None:
    """langchain-cohere's CohereRerank sends this (its cohere 5.x pin conflicts with our cohere 7.x,
    so the body it sends is replayed here)."""
    body = {
        "model": "rerank-v3.5",
        "query": QUERY,
        "documents": DOCUMENTS,
        "top_n": 2,
        "max_tokens_per_doc": None,
    }
    with server.client() as client:
        response = client.post("/v2/rerank", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["index"] == BEST


# A valid body per operation of /openapi.json; the fields set to null come from the document.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/rerank": {"query": QUERY, "documents": DOCUMENTS},
    "/v1/rerank": {"query": QUERY, "documents": DOCUMENTS},
    "/v2/rerank": {"model": "m", "query": QUERY, "documents": DOCUMENTS},
    "/embed": {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "hello"}]},
    "/v1/embeddings": {"input": ["hello"]},
    "/v1/jobs": {"type": "embed", "input": {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "hi"}]}},
    "/": {"inputs": "hello"},
    "/tokenize": {"inputs": "hello"},
    "/infinity/rerank": {"query": QUERY, "documents": DOCUMENTS},
    "/infinity/embeddings": {"input": ["hello"]},
    "/v2/embed": {"model": "m", "texts": ["hello"], "input_type": "search_document"},
    "/v1/embed": {"texts": ["hello"]},
    "/embed_all": {"inputs": "hello"},
    # Served by a classifier and a sparse model (kinds_server).
    "/predict": {"inputs": "hello"},
    "/infinity/classify": {"input": ["hello"]},
    "/embed_sparse": {"inputs": "hello"},
}
KIND_PATHS = frozenset({"/predict", "/infinity/classify", "/embed_sparse"})
# Cohere's texts is optional because inputs may stand for it: nulled, the inputs form carries the text.
INSTEAD = {
    ("/v2/embed", "texts"): {"inputs": [{"content": [{"type": "text", "text": "hello"}]}]},
}
NULL_IS_MISSING = {("/v1/embed", "texts")}  # v1's only text field (images are its alternative): 422 naming it
DOCUMENT = openapi_document(make_settings(), protected=False)


def optional_fields() -> list[tuple[str, str, str]]:
    cases = []
    for path, item in DOCUMENT["paths"].items():
        for operation in item.values():
            if "requestBody" not in operation:
                continue
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            name = ref.rsplit("/", 1)[1]
            schema = DOCUMENT["components"]["schemas"][name]
            required = set(schema.get("required", []))
            cases += [(path, name, field) for field in schema["properties"] if field not in required]
    return cases


@pytest.fixture(scope="module")
def kinds_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A classifier and a sparse model (tests/kind_models.py): the routes of those kinds."""
    from tests.kind_models import classifier, splade

    root = tmp_path_factory.mktemp("kinds")
    models = f"sentiment={classifier(root / 'sentiment')},splade={splade(root / 'splade')}"
    with ServerThread(create_app(make_settings(models=models))) as running:
        yield running


@pytest.mark.parametrize(("path", "schema", "field"), optional_fields(), ids=lambda value: value)
def test_null_is_the_default_for_every_optional_field(
    request: pytest.FixtureRequest, path: str, schema: str, field: str
) -> None:
    assert path in VALID_BODIES, f"{path}: give it a valid body in VALID_BODIES"
    documented = DOCUMENT["components"]["schemas"][schema]["properties"][field]
    assert {"type": "null"} in documented.get("anyOf", []), f"{schema}.{field}: the document must allow null"
    server: ServerThread = request.getfixturevalue("kinds_server" if path in KIND_PATHS else "server")
    with server.client() as client:
        response = client.post(
            path, json={**VALID_BODIES[path], **INSTEAD.get((path, field), {}), field: None}
        )
    if (path, field) in NULL_IS_MISSING:
        assert response.status_code == 422 and field in response.json()["error"]["message"]
        return
    assert response.status_code in (200, 202), response.text
