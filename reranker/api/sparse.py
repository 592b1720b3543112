"""Sparse (SPLADE) embeddings: TEI's ``POST /embed_sparse`` and this server's ``/embed`` on a
sparse model (``{"chunk_id", "indices", "values"}`` per chunk: what Qdrant, Milvus, OpenSearch
and Elasticsearch take). Only the non-zero weights are sent, in ascending token-id order; a
request's ``top_k`` keeps the largest."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_json, unless_disconnected, validate
from reranker.api.dialects import TEI, speak
from reranker.api.observe import model_of, runtime_of, timing_headers
from reranker.api.responses import json_response
from reranker.api.schemas import check_embed_limits
from reranker.api.tei import TeiInputs, long_refused
from reranker.api.text_limits import fit_texts
from reranker.engine.service import EmbedOutcome
from reranker.kinds.sparse import sparse_entries


class TeiSparseRequest(TeiInputs):
    prompt_name: str | None = Field(None, description="A prompt of the model's configuration, prepended.")


async def embed_sparse(request: Request, data: Any, started: float) -> Response:
    """TEI's ``POST /embed_sparse``: ``[[{"index", "value"}, ...], ...]``, one list per input."""
    speak(request, TEI)
    runtime = runtime_of(request)
    body = validate(TeiSparseRequest, data)
    texts = body.texts()
    check_embed_limits(runtime.settings, texts)
    model = model_of(request, None, "embed_sparse")
    service = model.require_service()
    labels = [f"inputs.{i}" for i in range(len(texts))]
    texts = fit_texts(runtime.settings, texts, labels, service.max_tokens if body.truncate else None, "")
    query = service.inference_free and service.is_query(body.prompt_name, None)  # the static table
    prompt = "" if query else service.embed_prompt(body.prompt_name, None)
    work = service.embed(texts, allow_truncation=body.truncate, prompt=prompt, query=query)
    work = unless_disconnected(request, work)
    outcome: EmbedOutcome = await long_refused(work, "inputs", service.max_tokens)
    answer = []
    for vector in outcome.vectors:
        indices, values = sparse_entries(vector)
        answer.append([{"index": int(i), "value": float(v)} for i, v in zip(indices, values, strict=True)])
    return await json_response(answer, headers=timing_headers(request, outcome.timing, started, len(texts)))


async def embed_sparse_route(request: Request) -> Response:
    started = time.perf_counter()
    settings = runtime_of(request).settings
    data = await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s)
    return await embed_sparse(request, data, started)
