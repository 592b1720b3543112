"""POST /rerank (native shape), /v1/rerank (Cohere v1 / Jina shape) and /v2/rerank (Cohere v2):
each a parse/render pair over a ``RerankCall`` (pipeline.py).

/rerank truncates a document at the model window (as sentence-transformers does);
/v1 and /v2 chunk it by default: the score of a long document is the best score of its
overlapping windows (``truncate``: ``END`` truncates, ``NONE`` refuses with 422). A text over
MAX_TEXT_CHARS is cut to what the request could score, or refused under ``NONE`` (text_limits.py).
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from starlette.requests import Request

from reranker.api import tei
from reranker.api.calls import RerankCall, Reranked
from reranker.api.observe import timing_ms
from reranker.api.pipeline import Dialect, Rendering, choosing, handler
from reranker.api.schemas import (
    CohereRerankRequest,
    CohereV2RerankRequest,
    LongDocumentOptions,
    RerankRequest,
)
from reranker.engine.model import ServedModel
from reranker.engine.rerank_results import cohere_v1_body, ranked, result_details, scores_of, warnings
from reranker.engine.service import TRUNCATE, LongDocuments
from reranker.settings import Settings

REFUSED = 'truncate is "NONE"'


def long_documents(
    body: LongDocumentOptions, settings: Settings, max_windows: int | None = None
) -> LongDocuments:
    mode = {"END": "truncate", "NONE": "refuse"}.get(body.truncate or "CHUNK", "chunk")
    windows = max_windows or body.max_chunks_per_doc or settings.max_chunks_per_doc
    return LongDocuments(mode, windows, settings.chunk_overlap_tokens, settings.rerank_window_tokens)


def model_window(model: ServedModel) -> int:
    return model.info.max_length if model.info else 0


def parse_native(body: RerankRequest, settings: Settings) -> RerankCall:
    top_k, top_field = body.limit
    return RerankCall(
        query=body.query,
        documents=body.documents,
        long=TRUNCATE,  # /rerank truncates at the model window
        instruction=body.instruction,
        max_tokens_per_doc=None,
        top_n=top_k,
        raw_scores=body.raw_scores,
        return_documents=body.return_documents,
        return_details=False,
        top_field=top_field,
        labels=("query", "documents"),
        because="",
    )


def render_native(r: Rendering[RerankRequest, RerankCall, Reranked]) -> dict[str, Any]:
    outcome, call = r.result.outcome, r.call
    scores = scores_of(outcome, call.raw_scores)
    results: list[dict[str, Any]] = []
    for index in ranked(outcome, call.top_n):
        result: dict[str, Any] = {"index": index, "score": float(scores[index])}
        if call.return_documents:
            result["document"] = r.body.documents[index]
        results.append(result)
    content = {
        "results": results,
        "model": r.model.name,
        "usage": {
            "documents": len(r.body.documents),
            "total_tokens": outcome.tokens,
            "truncated_documents": outcome.truncated,
        },
        "timing_ms": timing_ms(outcome.timing, r.started),
    }
    if r.notes:
        content["warnings"] = r.notes
    return content


def parse_v1(body: CohereRerankRequest, settings: Settings) -> RerankCall:
    return RerankCall(
        query=body.query,
        documents=body.texts(),
        long=long_documents(body, settings),
        instruction=body.instruction,
        max_tokens_per_doc=None,
        top_n=body.top_n,
        raw_scores=body.raw_scores,
        return_documents=body.return_documents,
        return_details=body.return_details,
        top_field="top_n",
        labels=("query", "documents"),
        because=REFUSED,
    )


def render_v1(r: Rendering[CohereRerankRequest, RerankCall, Reranked]) -> dict[str, Any]:
    call = r.call
    return cohere_v1_body(
        r.result.outcome,
        r.body.documents,
        top_n=call.top_n,
        return_documents=call.return_documents,
        return_details=call.return_details,
        raw_scores=call.raw_scores,
        long=call.long,
        window=model_window(r.model),
    )


def parse_v2(body: CohereV2RerankRequest, settings: Settings) -> RerankCall:
    """Cohere v2: documents beyond ``max_tokens_per_doc`` tokens are cut; the rest is chunked."""
    return RerankCall(
        query=body.query,
        documents=body.documents,
        long=long_documents(body, settings, max_windows=None if body.max_chunks_per_doc else 1000),
        instruction=body.instruction,
        max_tokens_per_doc=body.max_tokens_per_doc,
        top_n=body.top_n,
        raw_scores=body.raw_scores,
        return_documents=False,  # v2 answers indices only
        return_details=body.return_details,
        top_field="top_n",
        labels=("query", "documents"),
        because=REFUSED,
    )


def render_v2(r: Rendering[CohereV2RerankRequest, RerankCall, Reranked]) -> dict[str, Any]:
    outcome, call, cut = r.result.outcome, r.call, r.result.cut
    scores = scores_of(outcome, call.raw_scores)
    results: list[dict[str, Any]] = []
    for index in ranked(outcome, call.top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if call.return_details:
            result["details"] = result_details(outcome, index) | {
                "truncated": index in cut or index in outcome.truncated_documents
            }
        results.append(result)
    notes = warnings(outcome, call.long, model_window(r.model))
    if cut:
        notes.append(f"{len(cut)} document(s) were cut at max_tokens_per_doc={call.max_tokens_per_doc}")
    meta: dict[str, Any] = {
        "api_version": {"version": "2"},
        "billed_units": {"search_units": math.ceil(len(call.documents) / 100)},
        "tokens": {"input_tokens": outcome.tokens, "output_tokens": 0},
    }
    if notes:
        meta["warnings"] = notes
    return {"id": str(uuid.uuid4()), "results": results, "meta": meta}


NATIVE = Dialect(RerankRequest, "rerank", parse_native, render_native, warns=True)
COHERE_V1 = Dialect(CohereRerankRequest, "rerank", parse_v1, render_v1)
COHERE_V2 = Dialect(CohereV2RerankRequest, "rerank", parse_v2, render_v2)


def _native_or_tei(request: Request, data: Any) -> tuple[Dialect[Any, Any, Any], Any]:
    return (tei.RERANK if tei.is_tei_rerank(data) else NATIVE), data


rerank = choosing(_native_or_tei)
rerank_v1 = handler(COHERE_V1)
rerank_v2 = handler(COHERE_V2)
