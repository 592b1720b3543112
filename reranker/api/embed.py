"""POST /embed (ingestion-worker shape) and POST /v1/embeddings (OpenAI shape)."""

from __future__ import annotations

import base64
import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from reranker.api import tei
from reranker.api.body import read_body, read_json, unknown_fields, unless_disconnected, validate
from reranker.api.observe import model_of, runtime_of, timing_headers, timing_ms
from reranker.api.responses import json_response
from reranker.api.schemas import EmbedRequest, OpenAIEmbeddingRequest, check_embed_limits
from reranker.api.text_limits import check_dimensions, fit_texts
from reranker.backends.base import ModelKind
from reranker.engine.quantize import SCALAR_TYPES, encode_types
from reranker.engine.service import (
    EmbedOutcome,
    InferenceService,
    TextTooLongError,
    l2_normalize,
)
from reranker.errors import InvalidInputError
from reranker.kinds.sparse import sparse_entries


async def _embed(
    request: Request,
    service: InferenceService,
    texts: list[str],
    labels: list[str],
    prompt_choice: EmbedRequest | OpenAIEmbeddingRequest,
    **options: bool | None,
) -> EmbedOutcome:
    """The service's embed with the prompt the request chose (an unknown one: 422 listing the model's)."""
    query = service.inference_free and service.is_query(prompt_choice.prompt_name, prompt_choice.input_type)
    prompt = "" if query else service.embed_prompt(prompt_choice.prompt_name, prompt_choice.input_type)
    try:
        return await unless_disconnected(request, service.embed(texts, prompt=prompt, query=query, **options))
    except TextTooLongError as exc:
        raise InvalidInputError(
            f"{labels[exc.position]}: longer than the model's {exc.max_tokens} tokens and truncate is false"
        ) from None


async def embed(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    settings = runtime.settings
    data = await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s)
    if tei.is_tei_embed(data):
        return await tei.embed(request, data, started)
    body = validate(EmbedRequest, data)
    notes = unknown_fields(EmbedRequest, data)
    texts = [chunk.content for chunk in body.chunks]
    labels = [f"chunks.{i} (chunk_id {c.chunk_id!r})" for i, c in enumerate(body.chunks)]
    check_embed_limits(runtime.settings, texts)
    model = model_of(request, body.model, ("embed", "embed_sparse"))
    service = model.require_service()
    budget = service.max_tokens if body.truncate else None
    texts = fit_texts(runtime.settings, texts, labels, budget, "truncate is false")
    is_sparse = model.info is not None and model.info.kind is ModelKind.SPARSE
    if is_sparse and body.embedding_type != "float":
        raise InvalidInputError(
            f"embedding_type {body.embedding_type}: a sparse model answers indices and values; "
            "omit embedding_type"
        )
    scalar = body.embedding_type in SCALAR_TYPES
    if scalar and body.normalize is False:
        raise InvalidInputError(
            f"embedding_type {body.embedding_type}: its codes are of the normalised vector; "
            "omit normalize or set it true"
        )
    normalize = True if scalar else body.normalize
    outcome = await _embed(
        request, service, texts, labels, body, normalize=normalize, allow_truncation=body.truncate
    )
    if is_sparse:
        vectors = [
            {
                "chunk_id": chunk.chunk_id,
                **dict(zip(("indices", "values"), sparse_entries(vector, body.top_k), strict=True)),
            }
            for chunk, vector in zip(body.chunks, outcome.vectors, strict=True)
        ]
    else:
        codes = outcome.vectors
        if body.embedding_type != "float":
            (codes,) = (await encode_types(model, codes, [body.embedding_type])).values()
        vectors = [
            {"chunk_id": chunk.chunk_id, "vector": vector}
            for chunk, vector in zip(body.chunks, codes, strict=True)
        ]
    content = {
        "batch_id": body.batch_id,
        "model": model.name,
        "dimension": int(outcome.vectors.shape[1]),
        "vectors": vectors,
        "usage": {
            "chunks": len(texts),
            "total_tokens": outcome.tokens,
            "truncated_chunks": outcome.truncated,
        },
        "timing_ms": timing_ms(outcome.timing, started),
    }
    if notes:
        content["warnings"] = notes
    return await json_response(content, headers=timing_headers(request, outcome.timing, started, len(texts)))


async def openai_embeddings(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, OpenAIEmbeddingRequest, runtime.settings)
    texts = body.texts()
    labels = [f"input.{i}" for i in range(len(texts))]
    check_embed_limits(runtime.settings, texts)
    model = model_of(request, body.model, "embed")
    service = model.require_service()
    texts = fit_texts(runtime.settings, texts, labels, service.max_tokens, "")  # always truncates
    check_dimensions("dimensions", body.dimensions, model.info.dimension if model.info else None)
    outcome = await _embed(request, service, texts, labels, body)
    vectors = outcome.vectors
    if body.dimensions is not None and body.dimensions < vectors.shape[1]:
        vectors = l2_normalize(vectors[:, : body.dimensions])
    data = [
        {"object": "embedding", "index": index, "embedding": _encode(vector, body.encoding_format)}
        for index, vector in enumerate(vectors)
    ]
    content = {
        "object": "list",
        "data": data,
        "model": body.model or model.name,
        "usage": {"prompt_tokens": outcome.tokens, "total_tokens": outcome.tokens},
    }
    return await json_response(content, headers=timing_headers(request, outcome.timing, started, len(texts)))


def _encode(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector
