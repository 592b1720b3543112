"""POST /rerank (native shape), /v1/rerank (Cohere v1 / Jina shape) and /v2/rerank (Cohere v2).

/rerank truncates a document at the model window (as sentence-transformers does);
/v1 and /v2 chunk it by default: the score of a long document is the best score of its
overlapping windows (``truncate``: ``END`` truncates, ``NONE`` refuses with 422). A text over
MAX_TEXT_CHARS is cut to what the request could score, or refused under ``NONE`` (text_limits.py).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from reranker.api import tei
from reranker.api.body import read_body, read_json, unknown_fields, unless_disconnected, validate
from reranker.api.observe import model_of, runtime_of, timing_headers, timing_ms
from reranker.api.responses import ORJSONResponse
from reranker.api.schemas import (
    CohereRerankRequest,
    CohereV2RerankRequest,
    LongDocumentOptions,
    RerankRequest,
    check_limits,
)
from reranker.api.text_limits import document_tokens, fit_rerank
from reranker.engine.model import ServedModel
from reranker.engine.rerank_results import cohere_v1_body, ranked, result_details, scores_of, warnings
from reranker.engine.service import LongDocuments, RerankOutcome, TextTooLongError
from reranker.errors import InvalidInputError
from reranker.settings import Settings


async def rerank(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    settings = runtime.settings
    data = await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s)
    if tei.is_tei_rerank(data):
        return await tei.rerank(request, data, started)
    body = validate(RerankRequest, data)
    notes = unknown_fields(RerankRequest, data)
    top_k, top_name = body.limit
    check_limits(runtime.settings, body.query, body.documents, top_k, top_name)
    model = model_of(request, body.model, "rerank")
    service = model.require_service()
    window = service.max_tokens  # /rerank truncates at the model window
    query, documents = fit_rerank(settings, body.query, body.documents, window, window, "")
    rerank_call = service.rerank(query, documents, instruction=body.instruction)
    outcome = await unless_disconnected(request, rerank_call)
    scores = scores_of(outcome, body.raw_scores)
    results: list[dict[str, Any]] = []
    for index in ranked(outcome, top_k):
        result: dict[str, Any] = {"index": index, "score": float(scores[index])}
        if body.return_documents:
            result["document"] = body.documents[index]
        results.append(result)
    content = {
        "results": results,
        "model": model.name,
        "usage": {
            "documents": len(body.documents),
            "total_tokens": outcome.tokens,
            "truncated_documents": outcome.truncated,
        },
        "timing_ms": timing_ms(outcome.timing, started),
    }
    if notes:
        content["warnings"] = notes
    return ORJSONResponse(
        content, headers=timing_headers(request, outcome.timing, started, len(body.documents))
    )


def long_documents(
    body: LongDocumentOptions, settings: Settings, max_windows: int | None = None
) -> LongDocuments:
    mode = {"END": "truncate", "NONE": "refuse"}.get(body.truncate or "CHUNK", "chunk")
    windows = max_windows or body.max_chunks_per_doc or settings.max_chunks_per_doc
    return LongDocuments(mode, windows, settings.chunk_overlap_tokens, settings.rerank_window_tokens)


async def rerank_long(
    request: Request, query: str, texts: list[str], long: LongDocuments, instruction: str | None = None
) -> RerankOutcome:
    """The service's rerank (the request's model: ``model_of``); a document refused for its
    length is a 422 naming it."""
    service = request.state.model.require_service()
    try:
        return await unless_disconnected(request, service.rerank(query, texts, long, instruction=instruction))
    except TextTooLongError as exc:
        raise InvalidInputError(
            f"documents.{exc.position}: longer than the model's {exc.max_tokens}-token window "
            '(query included) and truncate is "NONE"'
        ) from None


def model_window(model: ServedModel) -> int:
    return model.info.max_length if model.info else 0


async def rerank_v1(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, CohereRerankRequest, runtime.settings)
    texts = body.texts()
    check_limits(runtime.settings, body.query, texts, body.top_n)
    long = long_documents(body, runtime.settings)
    model = model_of(request, body.model, "rerank")
    window = model.require_service().max_tokens
    budget = document_tokens(long, window)
    query, texts = fit_rerank(runtime.settings, body.query, texts, window, budget, 'truncate is "NONE"')
    outcome = await rerank_long(request, query, texts, long, body.instruction)
    content = cohere_v1_body(
        outcome,
        body.documents,
        top_n=body.top_n,
        return_documents=body.return_documents,
        return_details=body.return_details,
        raw_scores=body.raw_scores,
        long=long,
        window=model_window(model),
    )
    return ORJSONResponse(content, headers=timing_headers(request, outcome.timing, started, len(texts)))


async def rerank_v2(request: Request) -> Response:
    """Cohere v2: documents beyond ``max_tokens_per_doc`` tokens are cut; the rest is chunked."""
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, CohereV2RerankRequest, runtime.settings)
    check_limits(runtime.settings, body.query, body.documents, body.top_n)
    model = model_of(request, body.model, "rerank")
    service = model.require_service()
    long = long_documents(body, runtime.settings, max_windows=None if body.max_chunks_per_doc else 1000)
    window, per_doc = service.max_tokens, body.max_tokens_per_doc  # documents are cut at per_doc always
    budget = min(per_doc, document_tokens(long, window) or per_doc)
    query, fitted = fit_rerank(runtime.settings, body.query, body.documents, window, budget, "")
    texts = await asyncio.to_thread(service.truncate_texts, fitted, per_doc)
    cut_by_budget = [
        i for i, (text, original) in enumerate(zip(texts, fitted, strict=True)) if text != original
    ]
    outcome = await rerank_long(request, query, texts, long, body.instruction)
    scores = scores_of(outcome, body.raw_scores)
    results: list[dict[str, Any]] = []
    for index in ranked(outcome, body.top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if body.return_details:
            result["details"] = result_details(outcome, index) | {
                "truncated": index in cut_by_budget or index in outcome.truncated_documents
            }
        results.append(result)
    notes = warnings(outcome, long, model_window(model))
    if cut_by_budget:
        notes.append(
            f"{len(cut_by_budget)} document(s) were cut at max_tokens_per_doc={body.max_tokens_per_doc}"
        )
    meta: dict[str, Any] = {
        "api_version": {"version": "2"},
        "billed_units": {"search_units": math.ceil(len(texts) / 100)},
        "tokens": {"input_tokens": outcome.tokens, "output_tokens": 0},
    }
    if notes:
        meta["warnings"] = notes
    content = {"id": str(uuid.uuid4()), "results": results, "meta": meta}
    return ORJSONResponse(content, headers=timing_headers(request, outcome.timing, started, len(texts)))
