"""Sparse (SPLADE) embeddings: TEI's ``POST /embed_sparse`` and this server's ``/embed`` on a
sparse model (``{"chunk_id", "indices", "values"}`` per chunk: what Qdrant, Milvus, OpenSearch
and Elasticsearch take). Only the non-zero weights are sent, in ascending token-id order; a
request's ``top_k`` keeps the largest. An ``EmbedCall`` (pipeline.py); an inference-free model
weights queries (``prompt_name`` "query") by its static table."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from reranker.api.calls import EmbedCall, Embedded, Prompt, labelled
from reranker.api.dialects import TEI
from reranker.api.pipeline import Dialect, Rendering, handler
from reranker.api.tei import REFUSED, TeiInputs
from reranker.kinds.sparse import sparse_entries
from reranker.settings import Settings


class TeiSparseRequest(TeiInputs):
    prompt_name: str | None = Field(None, description="A prompt of the model's configuration, prepended.")


def parse(body: TeiSparseRequest, settings: Settings) -> EmbedCall:
    texts = body.texts()
    return EmbedCall(
        texts=texts,
        prompt=Prompt(body.prompt_name, None, ()),
        normalize=None,
        truncate=body.truncate,
        cut_from=body.cut_from,
        dimensions=None,
        max_tokens=None,
        encodings=(),
        labels=labelled("inputs", len(texts)),
        dimensions_field="dimensions",
        because=REFUSED,
    )


def render(r: Rendering[TeiSparseRequest, EmbedCall, Embedded]) -> list[list[dict[str, Any]]]:
    """``[[{"index", "value"}, ...], ...]``, one list per input."""
    answer = []
    for vector in r.result.outcome.vectors:
        indices, values = sparse_entries(vector)
        answer.append([{"index": int(i), "value": float(v)} for i, v in zip(indices, values, strict=True)])
    return answer


TEI_SPARSE = Dialect(TeiSparseRequest, "embed_sparse", parse, render, speaks=TEI)
embed_sparse_route = handler(TEI_SPARSE)
