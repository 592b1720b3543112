"""What a request means for the model: tokenize, run through the controller, post-process.

Rerank on a cross-encoder scores (query, document) pairs and applies our own
sigmoid to the single logit. Rerank on a bi-encoder embeds the query and the
documents and returns cosine similarities.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reranker.backends.base import Backend, Encoded, ModelKind
from reranker.engine.controller import InferenceController, InferenceResult
from reranker.errors import InvalidInputError, UnsupportedOperationError

log = logging.getLogger(__name__)


class TextTooLongError(InvalidInputError):
    """A text exceeds the model window and the request forbade truncation."""

    def __init__(self, position: int, max_tokens: int) -> None:
        super().__init__(
            f"text {position} is longer than the model's {max_tokens} tokens and truncate is false"
        )
        self.position = position
        self.max_tokens = max_tokens


@dataclass(frozen=True, slots=True)
class Timing:
    queue_ms: float
    inference_ms: float
    batch_size: int

    @classmethod
    def of(cls, result: InferenceResult) -> Timing:
        return cls(result.queue_ms, result.inference_ms, result.batch_size)


@dataclass(frozen=True, slots=True)
class RerankOutcome:
    scores: np.ndarray  # one per document, in request order
    tokens: int
    truncated: int  # documents whose input was cut at the model's max length
    timing: Timing


@dataclass(frozen=True, slots=True)
class EmbedOutcome:
    vectors: np.ndarray  # [n, dim] float32, in request order
    tokens: int
    truncated: int  # texts cut at the model's max length
    timing: Timing


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class InferenceService:
    def __init__(self, backend: Backend, controller: InferenceController, timeout_s: float) -> None:
        self._backend = backend
        self._controller = controller
        self._timeout_s = timeout_s
        self.kind = backend.info().kind

    async def rerank(self, query: str, documents: Sequence[str]) -> RerankOutcome:
        if self.kind is ModelKind.CROSS_ENCODER:
            pairs = [(query, doc) for doc in documents]
            encoded = await asyncio.to_thread(self._backend.tokenize_pairs, pairs)
            result = await self._controller.run(encoded, self._timeout_s)
            scores = sigmoid(result.outputs)
            truncated = encoded
        else:
            encoded = await asyncio.to_thread(self._backend.tokenize_texts, [query, *documents])
            result = await self._controller.run(encoded, self._timeout_s)
            vectors = l2_normalize(result.outputs)
            scores = (vectors[1:] @ vectors[0]).astype(np.float32)
            truncated = encoded[1:]
        return RerankOutcome(
            scores=scores,
            tokens=_token_count(encoded),
            truncated=sum(1 for item in truncated if item.truncated),
            timing=Timing.of(result),
        )

    async def embed(
        self, texts: Sequence[str], normalize: bool | None = None, allow_truncation: bool = True
    ) -> EmbedOutcome:
        """Embed ``texts``; ``normalize`` None follows the model's own configuration.

        With ``allow_truncation`` False a text longer than the model window raises
        ``TextTooLongError`` naming its position, before any model work.
        """
        info = self._backend.info()
        if self.kind is not ModelKind.BI_ENCODER:
            raise UnsupportedOperationError(
                f"the loaded model {info.name} is a cross-encoder: it scores pairs and cannot embed; "
                "use /rerank, or serve a bi-encoder"
            )
        encoded = await asyncio.to_thread(self._backend.tokenize_texts, texts)
        truncated = [i for i, item in enumerate(encoded) if item.truncated]
        if truncated and not allow_truncation:
            raise TextTooLongError(truncated[0], info.max_length)
        if len(encoded) > self._controller.batch_limit:
            batches = math.ceil(len(encoded) / self._controller.batch_limit)
            log.info("Processing %d texts in %d batches", len(encoded), batches)
        result = await self._controller.run(encoded, self._timeout_s)
        vectors = result.outputs.astype(np.float32, copy=False)
        if info.normalize_embeddings if normalize is None else normalize:
            vectors = l2_normalize(vectors)
        return EmbedOutcome(vectors, _token_count(encoded), len(truncated), Timing.of(result))


def _token_count(encoded: Sequence[Encoded]) -> int:
    return sum(len(item) for item in encoded)
