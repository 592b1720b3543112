"""What a rerank outcome answers in Cohere's v1 shape: ``/v1/rerank``'s body and a rerank job's
output are built here, once, so a job answers exactly what the endpoint answers (details,
warnings and all)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from reranker.engine.service import LongDocuments, RerankOutcome


def ranked(outcome: RerankOutcome, limit: int | None) -> list[int]:
    """Indices best first by the raw logit or cosine (sigmoid scores of large logits tie at 1.0);
    exact ties keep request order (stable), so rankings are deterministic."""
    order = np.argsort(-outcome.ranking, kind="stable")
    return [int(i) for i in order[: limit or len(order)]]


def scores_of(outcome: RerankOutcome, raw_scores: bool) -> np.ndarray:
    """The scores a request asked for: the model's activation of the logit, or with ``raw_scores``
    the logit itself (a bi-encoder's cosine either way)."""
    return outcome.ranking if raw_scores else outcome.scores


def result_details(outcome: RerankOutcome, index: int) -> dict[str, Any]:
    windows = outcome.windows[index]
    return {"windows": windows, "chunked": windows > 1, "truncated": index in outcome.truncated_documents}


def warnings(outcome: RerankOutcome, long: LongDocuments, window: int) -> list[str]:
    notes = []
    chunked = sum(1 for windows in outcome.windows if windows > 1)
    if chunked:
        notes.append(
            f"{chunked} document(s) longer than the model's {window}-token window were scored as the best "
            f"of their overlapping windows (up to {long.max_windows} each)"
        )
    if outcome.truncated_documents:
        what = "beyond their windows" if long.mode == "chunk" else "beyond the model window"
        notes.append(
            f"{len(outcome.truncated_documents)} document(s) were truncated: their text {what} was not scored"
        )
    return notes


def cohere_v1_body(
    outcome: RerankOutcome,
    documents: Sequence[str | dict[str, Any]],
    *,
    top_n: int | None,
    return_documents: bool,
    return_details: bool,
    raw_scores: bool,
    long: LongDocuments,
    window: int,
) -> dict[str, Any]:
    """``{"id", "results", "meta", "usage"}`` as Cohere's v1 rerank answers (``documents`` as sent)."""
    scores = scores_of(outcome, raw_scores)
    results: list[dict[str, Any]] = []
    for index in ranked(outcome, top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if return_documents:
            doc = documents[index]
            result["document"] = {"text": doc} if isinstance(doc, str) else doc
        if return_details:
            result["details"] = result_details(outcome, index)
        results.append(result)
    meta: dict[str, Any] = {
        "api_version": {"version": "1"},
        "billed_units": {"search_units": math.ceil(len(documents) / 100)},
    }
    notes = warnings(outcome, long, window)
    if notes:
        meta["warnings"] = notes
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": meta,
        "usage": {"total_tokens": outcome.tokens},
    }
