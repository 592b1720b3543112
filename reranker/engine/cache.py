"""Prediction cache: model outputs per input, looked up before the queue.

What is cached is the raw model output of one item - a cross-encoder's logit
for a (query, document) pair, a bi-encoder's pooled vector for a text (before
normalisation) - with its token count and truncation flag. Everything after the
model (sigmoid, cosine, normalisation, ``dimensions``, encoding) is recomputed
per request, so request options are not part of the key and a cached answer is
exactly what the same item computed earlier gave.

Keys are a 128-bit BLAKE2b hash of (model, input kind, texts); entries expire
after ``ttl_s`` (0: never) and the least recently used go first when full.
Only touched from the event loop thread, so no lock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache, TTLCache


@dataclass(frozen=True, slots=True)
class CachedOutput:
    output: np.ndarray  # per window of the item: logits [w] or vectors [w, dim]
    tokens: int
    truncated: bool


class PredictionCache:
    def __init__(
        self, model: str, max_entries: int, ttl_s: float, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self._model = model.encode()
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: LRUCache[bytes, CachedOutput] = (
            TTLCache(maxsize=max_entries, ttl=ttl_s, timer=timer)
            if ttl_s > 0
            else LRUCache(maxsize=max_entries)
        )
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, *texts: str) -> bytes:
        digest = hashlib.blake2b(digest_size=16, person=b"reranker-cache")
        for part in (self._model, kind.encode(), *(text.encode() for text in texts)):
            digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: ("ab","c") != ("a","bc")
            digest.update(part)
        return digest.digest()

    def get_many(self, keys: Sequence[bytes]) -> dict[int, CachedOutput]:
        """Positions of ``keys`` that are cached, with their entries; counts hits and misses."""
        found = {}
        for position, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None:
                found[position] = entry
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put(self, key: bytes, entry: CachedOutput) -> None:
        self._entries[key] = entry

    def stats(self) -> dict[str, object]:
        lookups = self.hits + self.misses
        return {
            "enabled": True,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
            "size": len(self._entries),
            "max_size": self.max_entries,
            "ttl_s": self.ttl_s,
        }


DISABLED_STATS: dict[str, object] = {"enabled": False}
