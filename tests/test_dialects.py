"""Dialects are parse/render pairs over neutral calls (reranker/api/calls.py, pipeline.py): a
dialect cannot forget a feature.

Issue 26: the review found Infinity's routes dropping ``instruction``, ``prompt_name`` and
``input_type``. A call's fields have no defaults, so every parse states each feature; these tests
check that each dialect's parse carries what its vendor's body says into the call, that every
dialect the server has is in the table, and that the features reach the engine's methods.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest

import reranker.api
from reranker.api import calls, classify, cohere_embed, embed, embed_all, infinity, rerank, sparse, tei
from reranker.api.app import create_app
from reranker.api.pipeline import Dialect
from reranker.backends.base import ModelInfo, ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.service import InferenceService
from tests.conftest import make_settings
from tests.server import ServerThread

SETTINGS = make_settings()
Q, DOCS = "what is a cat", ["a cat is an animal", "a car is a machine"]


def test_no_call_field_has_a_default() -> None:
    """A field with a default could be left out by a dialect's parse without anyone noticing."""
    for call in (calls.RerankCall, calls.EmbedCall, calls.ClassifyCall, calls.TokenVectorsCall, calls.Prompt):
        defaulted = [
            f.name
            for f in dataclasses.fields(call)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        ]
        assert defaulted == [], f"{call.__name__}: {defaulted}"
    with pytest.raises(TypeError, match="instruction"):
        calls.RerankCall(  # type: ignore[call-arg]
            query=Q, documents=DOCS, long=rerank.TRUNCATE, max_tokens_per_doc=None, top_n=None,
            raw_scores=False, return_documents=False, return_details=False, top_field="top_n",
            labels=("query", "documents"), because="",
        )  # fmt: skip


# Each dialect, a body of its vendor's that asks for every feature it has, and what its call must say.
CASES: list[tuple[Dialect[Any, Any, Any], dict[str, Any], dict[str, Any]]] = [
    (
        rerank.NATIVE,
        {"query": Q, "documents": DOCS, "instruction": "judge", "raw_scores": True, "top_k": 1,
         "return_documents": True},
        {"instruction": "judge", "raw_scores": True, "top_n": 1, "top_field": "top_k",
         "return_documents": True},
    ),
    (
        rerank.COHERE_V1,
        {"query": Q, "documents": DOCS, "instruction": "judge", "raw_scores": True, "top_n": 1,
         "return_documents": True, "return_details": True, "truncate": "NONE"},
        {"instruction": "judge", "raw_scores": True, "top_n": 1, "return_documents": True,
         "return_details": True, "long.mode": "refuse"},
    ),
    (
        rerank.COHERE_V2,
        {"model": "m", "query": Q, "documents": DOCS, "instruction": "judge", "raw_scores": True,
         "top_n": 1, "return_details": True, "max_tokens_per_doc": 7, "max_chunks_per_doc": 3},
        {"instruction": "judge", "raw_scores": True, "top_n": 1, "return_details": True,
         "max_tokens_per_doc": 7, "long.max_windows": 3},
    ),
    (
        tei.RERANK,
        {"query": Q, "texts": DOCS, "raw_scores": True, "return_text": True, "truncate": False},
        {"raw_scores": True, "return_documents": True, "long.mode": "refuse", "labels": ("query", "texts")},
    ),
    (
        infinity.RERANK,
        {"query": Q, "documents": DOCS, "instruction": "judge", "raw_scores": True, "top_n": 1,
         "return_documents": True},
        {"instruction": "judge", "raw_scores": True, "top_n": 1, "return_documents": True},
    ),
    (
        embed.NATIVE,
        {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "x"}], "prompt_name": "query",
         "input_type": "document", "normalize": True, "truncate": False, "embedding_type": "int8"},
        {"prompt.name": "query", "prompt.input_type": "document", "normalize": True, "truncate": False,
         "encodings": ("int8",)},
    ),
    (
        embed.OPENAI,
        {"input": DOCS, "prompt_name": "query", "input_type": "document", "dimensions": 4},
        {"prompt.name": "query", "prompt.input_type": "document", "dimensions": 4},
    ),
    (
        infinity.EMBEDDINGS,
        {"input": DOCS, "prompt_name": "query", "input_type": "document", "dimensions": 4},
        {"prompt.name": "query", "prompt.input_type": "document", "dimensions": 4},
    ),
    (
        cohere_embed.V1,
        {"texts": DOCS, "input_type": "search_query", "embedding_types": ["int8"], "truncate": "NONE"},
        {"prompt.input_type": "search_query", "encodings": ("int8",), "truncate": False},
    ),
    (
        cohere_embed.V2,
        {"model": "m", "texts": DOCS, "input_type": "clustering", "output_dimension": 4, "max_tokens": 9},
        {"prompt.input_type": "clustering", "dimensions": 4, "max_tokens": 9, "encodings": ("float",)},
    ),
    (
        tei.EMBED,
        {"inputs": DOCS, "prompt_name": "query", "normalize": False, "dimensions": 4, "truncate": False},
        {"prompt.name": "query", "normalize": False, "dimensions": 4, "truncate": False},
    ),
    (
        sparse.TEI_SPARSE,
        {"inputs": DOCS, "prompt_name": "query", "truncate": False},
        {"prompt.name": "query", "truncate": False},
    ),
    (
        embed_all.TOKEN_VECTORS,
        {"inputs": DOCS, "prompt_name": "query", "truncate": False},
        {"prompt.name": "query", "truncate": False},
    ),
    (
        classify.PREDICT,
        {"inputs": [["a"], ["b", "c"]], "raw_scores": True, "truncate": False},
        {"raw_scores": True, "truncate": False, "inputs": ["a", ("b", "c")]},
    ),
    (
        classify.INFINITY,
        {"input": DOCS, "raw_scores": True},
        {"raw_scores": True, "inputs": DOCS},
    ),
]  # fmt: skip


def _attribute(call: object, dotted: str) -> Any:
    for name in dotted.split("."):
        call = getattr(call, name)
    return call


def _dialects() -> Iterator[tuple[str, Dialect[Any, Any, Any]]]:
    for module in pkgutil.iter_modules(reranker.api.__path__):
        loaded = importlib.import_module(f"reranker.api.{module.name}")
        for name, value in vars(loaded).items():
            if isinstance(value, Dialect):
                yield f"{module.name}.{name}", value


NAMES = {id(dialect): name for name, dialect in _dialects()}


@pytest.mark.parametrize(("dialect", "body", "expected"), CASES, ids=[NAMES[id(case[0])] for case in CASES])
def test_each_dialect_parses_every_feature_into_its_call(
    dialect: Dialect[Any, Any, Any], body: dict[str, Any], expected: dict[str, Any]
) -> None:
    call = dialect.parse(dialect.schema.model_validate(body), SETTINGS)
    assert {name: _attribute(call, name) for name in expected} == expected


def test_every_dialect_is_in_the_table() -> None:
    """A new dialect gets its row in CASES, with every feature its vendor's body has."""
    tested = {id(dialect) for dialect, _, _ in CASES}
    missing = sorted({name for name, dialect in _dialects() if id(dialect) not in tested})
    assert missing == []


# ---- the features reach the engine --------------------------------------------------------


class PromptedFake(FakeBackend):
    def info(self) -> ModelInfo:
        prompts = {"query": "query: ", "document": "passage: "}
        return dataclasses.replace(super().info(), prompts=prompts)


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ServerThread, list[dict[str, Any]]]]:
    """A server of a fake bi-encoder with prompts and a fake cross-encoder, recording what every
    ``InferenceService.embed`` and ``rerank`` is asked (the instruction is recorded, then dropped:
    the fake takes none)."""
    asked: list[dict[str, Any]] = []
    embed_, rerank_ = InferenceService.embed, InferenceService.rerank

    async def embed_spy(self: InferenceService, texts: Any, **options: Any) -> Any:
        asked.append({"prompt": options.get("prompt")})
        return await embed_(self, texts, **options)

    async def rerank_spy(
        self: InferenceService, query: str, documents: Any, *args: Any, **options: Any
    ) -> Any:
        asked.append({"instruction": options.pop("instruction", None)})
        return await rerank_(self, query, documents, *args, **options)

    monkeypatch.setattr(InferenceService, "embed", embed_spy)
    monkeypatch.setattr(InferenceService, "rerank", rerank_spy)
    backends = {"embed": PromptedFake(ModelKind.BI_ENCODER), "rerank": FakeBackend(ModelKind.CROSS_ENCODER)}
    app = create_app(make_settings(models="embed=fake-embedder,rerank=fake-reranker"), backends=backends)
    with ServerThread(app) as server:
        yield server, asked


RERANK_BODIES = {
    "/rerank": {"query": Q, "documents": DOCS},
    "/v1/rerank": {"query": Q, "documents": DOCS},
    "/v2/rerank": {"model": "rerank", "query": Q, "documents": DOCS},
    "/infinity/rerank": {"query": Q, "documents": DOCS},
}
EMBED_BODIES = {
    "/embed": {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": DOCS[0]}]},
    "/v1/embeddings": {"input": DOCS},
    "/infinity/embeddings": {"input": DOCS},
    "/v1/embed": {"texts": DOCS},
    "/v2/embed": {"model": "embed", "texts": DOCS, "input_type": "search_document"},
}


@pytest.mark.parametrize("path", RERANK_BODIES)
def test_an_instruction_reaches_the_engine_on_every_rerank_route(recorded, path: str) -> None:
    server, asked = recorded
    with server.client() as client:
        response = client.post(path, json={**RERANK_BODIES[path], "instruction": "judge"})
    assert response.status_code == 200, response.text
    assert asked == [{"instruction": "judge"}]


@pytest.mark.parametrize("path", EMBED_BODIES)
def test_the_chosen_prompt_reaches_the_engine_on_every_embedding_route(recorded, path: str) -> None:
    server, asked = recorded
    by_name = {} if path.startswith(("/v1/embed", "/v2/embed")) else {"prompt_name": "query"}
    with server.client() as client:
        for choice in ({"input_type": "search_query"}, by_name):
            if choice:
                response = client.post(path, json={**EMBED_BODIES[path], **choice, "model": "embed"})
                assert response.status_code == 200, response.text
    assert all(entry == {"prompt": "query: "} for entry in asked) and asked


def test_tei_routes_take_a_prompt_name_to_the_engine(recorded) -> None:
    server, asked = recorded
    with server.client() as client:
        embedded = client.post("/models/embed/embed", json={"inputs": DOCS, "prompt_name": "query"})
        at_root = client.post("/models/embed/", json={"inputs": DOCS, "prompt_name": "document"})
    assert embedded.status_code == 200 and at_root.status_code == 200, (embedded.text, at_root.text)
    assert asked == [{"prompt": "query: "}, {"prompt": "passage: "}]
