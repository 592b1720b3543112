"""What a request means for the model: tokenize, run through the controller, post-process.

Rerank on a cross-encoder scores (query, document) pairs and applies our own
sigmoid to the single logit. Rerank on a bi-encoder embeds the query and the
documents and returns cosine similarities. With a prediction cache, items
already computed are answered from it and only the rest are tokenized and queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from reranker.backends.base import Backend, Encoded, ModelKind
from reranker.engine.cache import CachedOutput, PredictionCache
from reranker.engine.controller import InferenceController
from reranker.errors import InvalidInputError, UnsupportedOperationError

log = logging.getLogger(__name__)
Input = TypeVar("Input", str, tuple[str, str])


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
    batch_size: int  # largest batch the request's items rode in; 0 when all came from the cache
    cache_hits: int = 0


@dataclass(frozen=True, slots=True)
class Computed:
    """Model outputs for every item of a request, from the cache or the model."""

    outputs: np.ndarray  # [n] logits or [n, dim] vectors, in request order
    tokens: int
    truncated: list[int]  # positions cut at the model's max length
    timing: Timing


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
    def __init__(
        self,
        backend: Backend,
        controller: InferenceController,
        timeout_s: float,
        cache: PredictionCache | None = None,
    ) -> None:
        self._backend = backend
        self._controller = controller
        self._timeout_s = timeout_s
        self._cache = cache
        self.kind = backend.info().kind

    async def _compute(
        self,
        inputs: Sequence[Input],
        tokenize: Callable[[list[Input]], list[Encoded]],
        refuse_truncated: Callable[[int], None] | None = None,
    ) -> Computed:
        """Outputs for ``inputs``: cached ones from the cache, the rest tokenized once and queued.

        ``refuse_truncated(position)`` may raise before any model work when an item is too long.
        """
        cache = self._cache
        cache_keys = [cache.key(*_texts_of(item)) for item in inputs] if cache is not None else []
        cached = cache.get_many(cache_keys) if cache is not None else {}
        missing = [i for i in range(len(inputs)) if i not in cached]
        encoded = await asyncio.to_thread(tokenize, [inputs[i] for i in missing]) if missing else []
        truncated = sorted(
            [i for i, entry in cached.items() if entry.truncated]
            + [i for i, item in zip(missing, encoded, strict=True) if item.truncated]
        )
        if truncated and refuse_truncated is not None:
            refuse_truncated(truncated[0])
        entries: dict[int, CachedOutput] = dict(cached)
        timing = Timing(0.0, 0.0, 0, cache_hits=len(cached))
        if missing:
            result = await self._controller.run(encoded, self._timeout_s)
            timing = Timing(result.queue_ms, result.inference_ms, result.batch_size, len(cached))
            for position, item, output in zip(missing, encoded, result.outputs, strict=True):
                entry = CachedOutput(output.copy(), len(item), item.truncated)
                entries[position] = entry
                if cache is not None:
                    cache.put(cache_keys[position], entry)
        ordered = [entries[i] for i in range(len(inputs))]
        return Computed(
            outputs=np.stack([entry.output for entry in ordered]),
            tokens=sum(entry.tokens for entry in ordered),
            truncated=truncated,
            timing=timing,
        )

    async def rerank(self, query: str, documents: Sequence[str]) -> RerankOutcome:
        if self.kind is ModelKind.CROSS_ENCODER:
            pairs = [(query, doc) for doc in documents]
            computed = await self._compute(pairs, self._backend.tokenize_pairs)
            scores = sigmoid(computed.outputs)
            truncated = len(computed.truncated)
        else:
            texts = [query, *documents]
            computed = await self._compute(texts, self._backend.tokenize_texts)
            vectors = l2_normalize(computed.outputs)
            scores = (vectors[1:] @ vectors[0]).astype(np.float32)
            truncated = sum(1 for position in computed.truncated if position > 0)  # documents only
        return RerankOutcome(scores, computed.tokens, truncated, computed.timing)

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
        if len(texts) > self._controller.batch_limit:
            batches = math.ceil(len(texts) / self._controller.batch_limit)
            log.info("Processing %d texts in %d batches", len(texts), batches)

        def refuse(position: int) -> None:
            raise TextTooLongError(position, info.max_length)

        computed = await self._compute(
            texts, self._backend.tokenize_texts, None if allow_truncation else refuse
        )
        vectors = computed.outputs.astype(np.float32, copy=False)
        if info.normalize_embeddings if normalize is None else normalize:
            vectors = l2_normalize(vectors)
        return EmbedOutcome(vectors, computed.tokens, len(computed.truncated), computed.timing)


def _texts_of(item: str | tuple[str, str]) -> tuple[str, ...]:
    """The cache key parts of an input: ("text", text) or ("pair", query, document)."""
    return ("text", item) if isinstance(item, str) else ("pair", *item)
