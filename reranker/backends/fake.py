"""A deterministic fake backend for fast controller and HTTP tests.

Scores and vectors are pure functions of the input tokens, so batch invariance
holds exactly. A test can make it slow without sleeping (``gate``: every batch
waits until the test opens it), make it fail, and read every batch it ran. Given a
``cost`` curve and a ``SimulatedClock``, each batch advances the clock by what it
would cost on that device (CPU-like: per padded token; GPU-like: flat), so a
controller timing batches with that clock sees the device's behaviour exactly.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from reranker.backends.base import Backend, Encoded, ModelInfo, ModelKind
from reranker.kinds import kind_of

DIMENSION = 8


class SimulatedClock:
    """A clock that moves only when a fake batch 'runs' (thread-safe)."""

    def __init__(self) -> None:
        self._now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def cpu_like(batch: Sequence[Encoded]) -> float:
    """About a small model on a few CPU cores: 1 ms a batch + 15 us per padded token."""
    return 0.001 + 1.5e-5 * len(batch) * max(len(item) for item in batch)


def gpu_like(batch: Sequence[Encoded]) -> float:
    """A launch-bound GPU: 4 ms a batch, padding next to free."""
    return 0.004 + 1e-9 * len(batch) * max(len(item) for item in batch)


class FakeBackend(Backend):
    def __init__(
        self,
        kind: ModelKind = ModelKind.BI_ENCODER,
        max_length: int = 64,
        fail_when: Callable[[Sequence[Encoded]], Exception | None] | None = None,
        dimension: int = DIMENSION,
        cost: Callable[[Sequence[Encoded]], float] | None = None,
        clock: SimulatedClock | None = None,
    ) -> None:
        self.kind = kind
        self.max_length = max_length
        self.fail_when = fail_when
        self.dimension = dimension
        self.cost = cost
        self.clock = clock
        self.gate = threading.Event()
        self.gate.set()
        self.batch_started = threading.Event()
        self.batches: list[list[int]] = []  # token lengths of every batch run, in order
        self._lock = threading.Lock()

    def info(self) -> ModelInfo:
        return ModelInfo(
            name="fake",
            kind=self.kind,
            backend="fake",
            device="cpu",
            max_length=self.max_length,
            dimension=self.dimension if kind_of(self.kind).output == "vector" else None,
        )

    def _encode(self, text: str, type_id: int) -> list[tuple[int, int]]:
        return [(zlib.crc32(word.encode()) % 30000 + 1, type_id) for word in text.split()]

    def _truncate(self, tokens: list[tuple[int, int]]) -> Encoded:
        kept = tokens[: self.max_length]
        return Encoded(
            ids=[t for t, _ in kept], type_ids=[s for _, s in kept], truncated=len(tokens) > len(kept)
        )

    def tokenize_texts(self, texts: Sequence[str]) -> list[Encoded]:
        return [self._truncate(self._encode(text, 0)) for text in texts]

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        return [self._truncate(self._encode(q, 0) + self._encode(d, 1)) for q, d in pairs]

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        with self._lock:
            self.batches.append([len(item) for item in batch])
        self.batch_started.set()
        self.gate.wait()
        if self.cost is not None and self.clock is not None:
            self.clock.advance(self.cost(batch))
        if self.fail_when is not None and (error := self.fail_when(batch)) is not None:
            raise error
        if kind_of(self.kind).one_score:
            return np.array([self._logit(item) for item in batch], dtype=np.float32)
        return np.stack([self._vector(item, self.dimension) for item in batch]).astype(np.float32)

    @staticmethod
    def _logit(item: Encoded) -> float:
        query = {t for t, s in zip(item.ids, item.type_ids, strict=True) if s == 0}
        doc = [t for t, s in zip(item.ids, item.type_ids, strict=True) if s == 1]
        overlap = sum(1 for t in doc if t in query)
        return 4.0 * overlap / (1 + len(doc)) - 1.0

    @staticmethod
    def _vector(item: Encoded, dimension: int = DIMENSION) -> np.ndarray:
        vector = np.zeros(dimension, dtype=np.float64)
        for token in item.ids:
            vector[token % dimension] += 1.0
        return vector + 0.01
