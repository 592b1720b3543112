"""POST /rerank (native shape) and POST /v1/rerank (Cohere v1 / Jina shape)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_body, unless_disconnected
from reranker.api.observe import inference_endpoint, runtime_of, timing_headers, timing_ms
from reranker.api.responses import ORJSONResponse
from reranker.api.schemas import CohereRerankRequest, RerankRequest, check_limits


def ranked(scores: np.ndarray, limit: int | None) -> list[int]:
    """Indices best first; ties keep request order (stable), so rankings are deterministic."""
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[: limit or len(order)]]


@inference_endpoint("/rerank")
async def rerank(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, RerankRequest, runtime.settings.max_request_bytes)
    check_limits(runtime.settings, body.query, body.documents)
    service = runtime.require_service()
    outcome = await unless_disconnected(request, service.rerank(body.query, body.documents))
    results: list[dict[str, Any]] = []
    for index in ranked(outcome.scores, body.top_k):
        result: dict[str, Any] = {"index": index, "score": float(outcome.scores[index])}
        if body.return_documents:
            result["document"] = body.documents[index]
        results.append(result)
    content = {
        "results": results,
        "model": runtime.model_name(),
        "usage": {
            "documents": len(body.documents),
            "total_tokens": outcome.tokens,
            "truncated_documents": outcome.truncated,
        },
        "timing_ms": timing_ms(outcome.timing, started),
    }
    return ORJSONResponse(content, headers=timing_headers(outcome.timing, started))


@inference_endpoint("/v1/rerank")
async def rerank_v1(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, CohereRerankRequest, runtime.settings.max_request_bytes)
    texts = body.texts()
    check_limits(runtime.settings, body.query, texts)
    service = runtime.require_service()
    outcome = await unless_disconnected(request, service.rerank(body.query, texts))
    results: list[dict[str, Any]] = []
    for index in ranked(outcome.scores, body.top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": float(outcome.scores[index])}
        if body.return_documents:
            doc = body.documents[index]
            result["document"] = {"text": doc} if isinstance(doc, str) else doc
        results.append(result)
    content = {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": {
            "api_version": {"version": "1"},
            "billed_units": {"search_units": math.ceil(len(texts) / 100)},
        },
        "usage": {"total_tokens": outcome.tokens},
    }
    return ORJSONResponse(content, headers=timing_headers(outcome.timing, started))
