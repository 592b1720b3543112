"""What an embed or rerank job does: the request's work, slice by slice, at background priority.

Each slice is a quarter of a batch, so the job batch an interactive request may find
running is short (on 2 CPU cores half a batch doubled a small request's latency); progress
advances and cancellation is checked between slices.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reranker.engine.jobs import Job
from reranker.engine.service import InferenceService, LongDocuments, TextTooLongError
from reranker.errors import InvalidInputError


def slices(job: Job, texts: list[str], service: InferenceService) -> Iterator[tuple[int, list[str]]]:
    """(start, slice) of a quarter batch each; cancellation is checked before each slice and
    progress advanced after the caller has processed it."""
    step = max(1, service.batch_limit // 4)
    for start in range(0, len(texts), step):
        job.check_cancelled()
        piece = texts[start : start + step]
        yield start, piece
        job.advance(len(piece))


@dataclass(frozen=True)
class EmbedJob:
    batch_id: str
    chunk_ids: list[str]
    texts: list[str]
    normalize: bool | None
    truncate: bool
    model: str

    async def __call__(self, job: Job, service: InferenceService) -> dict[str, Any]:
        parts: list[np.ndarray] = []
        tokens = truncated = 0
        for start, piece in slices(job, self.texts, service):
            try:
                outcome = await service.embed(piece, self.normalize, self.truncate, background=True)
            except TextTooLongError as exc:
                position = start + exc.position
                raise InvalidInputError(
                    f"chunks.{position} (chunk_id {self.chunk_ids[position]!r}): longer than the model's "
                    f"{exc.max_tokens} tokens and truncate is false"
                ) from None
            parts.append(outcome.vectors)
            tokens, truncated = tokens + outcome.tokens, truncated + outcome.truncated
        vectors = np.concatenate(parts)
        return {
            "batch_id": self.batch_id,
            "model": self.model,
            "dimension": int(vectors.shape[1]),
            "vectors": [{"chunk_id": c, "vector": v} for c, v in zip(self.chunk_ids, vectors, strict=True)],
            "usage": {"chunks": len(self.texts), "total_tokens": tokens, "truncated_chunks": truncated},
        }


@dataclass(frozen=True)
class RerankJob:
    query: str
    texts: list[str]
    documents: Sequence[Any]  # as sent, for return_documents
    top_n: int | None
    return_documents: bool
    long: LongDocuments

    async def __call__(self, job: Job, service: InferenceService) -> dict[str, Any]:
        scores: list[np.ndarray] = []
        tokens = 0
        for start, piece in slices(job, self.texts, service):
            try:
                outcome = await service.rerank(self.query, piece, self.long, background=True)
            except TextTooLongError as exc:
                raise InvalidInputError(
                    f"documents.{start + exc.position}: longer than the model's window "
                    'and truncate is "NONE"'
                ) from None
            scores.append(outcome.scores)
            tokens += outcome.tokens
        every = np.concatenate(scores)
        order = np.argsort(-every, kind="stable")[: self.top_n or len(every)]
        results = []
        for index in order:
            result: dict[str, Any] = {"index": int(index), "relevance_score": float(every[index])}
            if self.return_documents:
                doc = self.documents[index]
                result["document"] = {"text": doc} if isinstance(doc, str) else doc
            results.append(result)
        return {
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {
                "api_version": {"version": "1"},
                "billed_units": {"search_units": -(-len(every) // 100)},
            },
            "usage": {"total_tokens": tokens},
        }
