"""POST /embed (ingestion-worker shape) and POST /v1/embeddings (OpenAI shape): each a
parse/render pair over an ``EmbedCall`` (pipeline.py). /embed on a sparse model answers
indices and values per chunk (sparse.py)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from starlette.requests import Request

from reranker.api import tei
from reranker.api.calls import EmbedCall, Embedded, Prompt, is_sparse, labelled
from reranker.api.observe import timing_ms
from reranker.api.pipeline import Dialect, Rendering, choosing, handler
from reranker.api.schemas import EmbedRequest, OpenAIEmbeddingRequest
from reranker.engine.quantize import SCALAR_TYPES
from reranker.errors import InvalidInputError
from reranker.kinds.sparse import sparse_entries
from reranker.settings import Settings


def parse_native(body: EmbedRequest, settings: Settings) -> EmbedCall:
    scalar = body.embedding_type in SCALAR_TYPES
    if scalar and body.normalize is False:
        raise InvalidInputError(
            f"embedding_type {body.embedding_type}: its codes are of the normalised vector; "
            "omit normalize or set it true"
        )
    return EmbedCall(
        texts=[chunk.content for chunk in body.chunks],
        prompt=Prompt(body.prompt_name, body.input_type, ()),
        normalize=True if scalar else body.normalize,
        truncate=body.truncate,
        cut_from="end",
        dimensions=None,
        max_tokens=None,
        encodings=() if body.embedding_type == "float" else (body.embedding_type,),
        labels=[f"chunks.{i} (chunk_id {c.chunk_id!r})" for i, c in enumerate(body.chunks)],
        dimensions_field="dimensions",
        because="truncate is false",
    )


def render_native(r: Rendering[EmbedRequest, EmbedCall, Embedded]) -> dict[str, Any]:
    body, outcome = r.body, r.result.outcome
    vectors: list[dict[str, Any]]
    if is_sparse(r.model):
        vectors = [
            {
                "chunk_id": chunk.chunk_id,
                **dict(zip(("indices", "values"), sparse_entries(vector, body.top_k), strict=True)),
            }
            for chunk, vector in zip(body.chunks, outcome.vectors, strict=True)
        ]
    else:
        codes = r.result.codes.get(body.embedding_type, r.result.vectors)
        vectors = [
            {"chunk_id": chunk.chunk_id, "vector": vector}
            for chunk, vector in zip(body.chunks, codes, strict=True)
        ]
    content = {
        "batch_id": body.batch_id,
        "model": r.model.name,
        "dimension": int(outcome.vectors.shape[1]),
        "vectors": vectors,
        "usage": {
            "chunks": r.call.items,
            "total_tokens": outcome.tokens,
            "truncated_chunks": r.result.truncated,
        },
        "timing_ms": timing_ms(outcome.timing, r.started),
    }
    if r.notes:
        content["warnings"] = r.notes
    return content


def parse_openai(body: OpenAIEmbeddingRequest, settings: Settings) -> EmbedCall:
    """OpenAI's shape (Infinity's too): always truncates; ``dimensions`` cuts and re-normalises."""
    texts = body.texts()
    return EmbedCall(
        texts=texts,
        prompt=Prompt(body.prompt_name, body.input_type, ()),
        normalize=None,
        truncate=True,
        cut_from="end",
        dimensions=body.dimensions,
        max_tokens=None,
        encodings=(),
        labels=labelled("input", len(texts)),
        dimensions_field="dimensions",
        because="",
    )


def render_openai(r: Rendering[OpenAIEmbeddingRequest, EmbedCall, Embedded]) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": index, "embedding": encoded(vector, r.body.encoding_format)}
        for index, vector in enumerate(r.result.vectors)
    ]
    tokens = r.result.outcome.tokens
    return {
        "object": "list",
        "data": data,
        "model": r.body.model or r.model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def encoded(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector


NATIVE = Dialect(EmbedRequest, ("embed", "embed_sparse"), parse_native, render_native, warns=True)
OPENAI = Dialect(OpenAIEmbeddingRequest, "embed", parse_openai, render_openai)


def _native_or_tei(request: Request, data: Any) -> tuple[Dialect[Any, Any, Any], Any]:
    return (tei.EMBED if tei.is_tei_embed(data) else NATIVE), data


embed = choosing(_native_or_tei)
openai_embeddings = handler(OPENAI)
