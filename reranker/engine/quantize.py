"""Compact embedding types: int8/uint8 codes and packed sign bits (pure numpy).

``binary`` and ``ubinary`` are exactly sentence-transformers' ``quantize_embeddings``: one bit per
dimension (``x > 0``), packed MSB first, ``binary`` = byte - 128 as int8. ``int8`` and ``uint8``
are its formula with ranges (per-dimension min and max) fixed once per served model, so a text
gets the same codes whatever else is in its request. The ranges are computed on first use from
normalised embeddings of calibration texts: EMBEDDING_CALIBRATION_FILE (one text per line) when
set, else ``PROBE_TEXTS`` below. ``calibration_view`` says which, for /health.
"""

from __future__ import annotations

import asyncio
import base64
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from reranker.errors import StartupError

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
EMBEDDING_TYPES: tuple[str, ...] = ("float", "int8", "uint8", "binary", "ubinary", "base64")
SCALAR_TYPES = ("int8", "uint8")

# Varied short texts (questions, facts, code, lists, other languages) to find each dimension's
# range when no EMBEDDING_CALIBRATION_FILE is given.
_TOPICS = (
    "the history of the Roman empire",
    "how to bake sourdough bread at home",
    "symptoms of vitamin D deficiency",
    "the rules of cricket",
    "photosynthesis in plants",
    "installing Python packages with pip",
    "the stock market crash of 1929",
    "how black holes form",
    "training a puppy to sit",
    "the causes of inflation",
    "writing a cover letter for a job",
    "the water cycle",
    "quantum entanglement explained simply",
    "the best hiking trails in Patagonia",
    "how vaccines train the immune system",
    "SQL joins and indexes",
    "the French Revolution",
    "caring for succulents indoors",
    "electric car battery range",
    "the plot of Hamlet",
)
_FORMS = (
    "What is {}?",
    "A short guide to {}.",
    "{}: an overview for beginners, with examples and common mistakes.",
    "I read an article about {} yesterday and did not understand half of it.",
    "Notes: {} (see chapter 3)",
)
PROBE_TEXTS: tuple[str, ...] = (
    *(form.format(topic) for topic in _TOPICS for form in _FORMS),
    "def add(a, b):\n    return a + b",
    "SELECT name, count(*) FROM orders GROUP BY name ORDER BY 2 DESC;",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le chat dort sur le canapé depuis ce matin.",
    "El tren sale a las ocho y media de la estación central.",
    "東京は日本の首都です。",
    "1, 2, 3, 5, 8, 13, 21, 34",
    "Order #48213 shipped on 2024-03-02 via UPS, tracking 1Z999AA10123456784.",
    "lol that was the best game ever!!!",
    "Patient reports mild headache and nausea for two days; no fever.",
)


def quantize(vectors: np.ndarray, embedding_type: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` [n, dim] as ``embedding_type``: float32, int8/uint8 codes (``ranges`` [2, dim]:
    per-dimension min and max) or packed bits ([n, ceil(dim/8)])."""
    if embedding_type == "float":
        return vectors.astype(np.float32, copy=False)
    if embedding_type == "base64":  # Cohere's: each vector's little-endian float32 bytes, base64
        rows = vectors.astype("<f4", copy=False)
        return np.array([base64.b64encode(row.tobytes()).decode("ascii") for row in rows], dtype=object)
    if embedding_type == "binary":
        return (np.packbits(vectors > 0, axis=-1) - 128).astype(np.int8)
    if embedding_type == "ubinary":
        return np.packbits(vectors > 0, axis=-1)
    if embedding_type in SCALAR_TYPES:
        if ranges is None:
            raise ValueError(f"{embedding_type} needs ranges (calibrate first)")
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        codes = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return codes.astype(np.uint8) if embedding_type == "uint8" else (codes - 128).astype(np.int8)
    raise ValueError(f"unknown embedding type {embedding_type!r}; one of {', '.join(EMBEDDING_TYPES)}")


def ranges_of(calibration: np.ndarray) -> np.ndarray:
    """Per-dimension [min, max] over calibration embeddings [n, dim]: shape [2, dim]."""
    return np.vstack((np.min(calibration, axis=0), np.max(calibration, axis=0)))


def bytes_per_vector(embedding_type: str, dimension: int) -> int:
    if embedding_type in ("float", "base64"):
        return 4 * dimension
    if embedding_type in SCALAR_TYPES:
        return dimension
    return (dimension + 7) // 8


@dataclass
class Calibration:
    embeddings: np.ndarray  # [n, dim] float32, normalised: the calibration texts' vectors
    source: str  # "file" (EMBEDDING_CALIBRATION_FILE) or "probe" (PROBE_TEXTS)
    by_dimension: dict[int, np.ndarray] = field(default_factory=dict)  # ranges [2, d] per d

    def ranges(self, dimension: int) -> np.ndarray:
        """Ranges for vectors cut to their first ``dimension`` values and re-normalised
        (output_dimension), as the calibration vectors are treated the same way."""
        known = self.by_dimension.get(dimension)
        if known is None:
            embeddings = self.embeddings
            if dimension < embeddings.shape[1]:
                embeddings = l2_normalize(embeddings[:, :dimension])
            known = self.by_dimension[dimension] = ranges_of(embeddings).astype(np.float32)
        return known


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """The same as engine/service.py's (kept here so this module needs numpy only)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def calibration_texts(path: str | None) -> tuple[list[str], str]:
    """The texts that fix the ranges and where they come from ("file" or "probe")."""
    if not path:
        return list(PROBE_TEXTS), "probe"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise StartupError(f"EMBEDDING_CALIBRATION_FILE={path}: cannot be read ({exc})") from None
    texts = [line for line in lines if line.strip()]
    if len(texts) < 2:
        raise StartupError(
            f"EMBEDDING_CALIBRATION_FILE={path}: {len(texts)} non-empty lines; give at least 2 "
            "(one text per line; a few hundred representative ones is better)"
        )
    return texts, "file"


# Per served model (held weakly: a model gone from the server takes its ranges with it).
_calibrations: weakref.WeakKeyDictionary[Any, Calibration] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


async def calibration_of(model: Any) -> Calibration:
    """The served ``model``'s calibration: its texts embedded once, on first use, normalised,
    with the document prompt (the side a store of codes holds)."""
    known = _calibrations.get(model)
    if known is not None:
        return known
    lock = _locks.setdefault(model, asyncio.Lock())
    async with lock:
        known = _calibrations.get(model)
        if known is None:
            texts, source = calibration_texts(model.settings.embedding_calibration_file)
            service = model.require_service()
            prompt = service.embed_prompt(None, "search_document")
            outcome = await service.embed(texts, normalize=True, prompt=prompt)
            known = _calibrations[model] = Calibration(outcome.vectors.astype(np.float32), source)
        return known


async def encode_types(model: Any, vectors: np.ndarray, types: Sequence[str]) -> dict[str, np.ndarray]:
    """``vectors`` (normalised, [n, d]) as each of ``types``; int8/uint8 with ``model``'s ranges."""
    ranges = None
    if any(kind in SCALAR_TYPES for kind in types):
        ranges = (await calibration_of(model)).ranges(vectors.shape[1])
    return {kind: quantize(vectors, kind, ranges) for kind in types}


def calibration_view(model: Any) -> dict[str, Any]:
    """For /health: where ``model``'s int8/uint8 ranges come from and whether they are fixed yet."""
    path = model.settings.embedding_calibration_file
    known = _calibrations.get(model)
    return {
        "source": known.source if known else ("file" if path else "probe"),
        "file": path or None,
        "texts": len(known.embeddings) if known else (None if path else len(PROBE_TEXTS)),
        "computed": known is not None,
    }
