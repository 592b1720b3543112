"""How close one way of running a model is to float32 torch, measured at start-up on probe texts.

Three checks use it: ONNX int8 against ONNX_INT8_MIN_AGREEMENT, half precision (bfloat16,
float16) against HALF_PRECISION_MIN_AGREEMENT, and ONNX float32, which ``BACKEND=auto``
serves on a CPU only when its answers are within ``EXACT`` of torch's.

``Agreement.value`` is 1.0 for identical answers. Bi-encoders: the worst cosine of a probe
vector to float32's. Cross-encoders: 1 minus the largest difference of a probe pair's sigmoid
score from float32's. ``Agreement.largest`` is the largest absolute difference of what is
served: unit vectors (bi-encoders), raw logits (cross-encoders).

The half-precision floor (``meets_half_floor``): vectors need a worst cosine of at least the
floor (default 0.999; bfloat16 measured 0.99994 on all-MiniLM-L6-v2's probes); a score, one
number where a vector's error averages over hundreds of components, may differ by
``SCORE_SCALE`` times the vectors' gap: 0.02 at the default floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reranker.kinds import ModelKind, kind_of

EXACT = 1e-5  # ONNX float32 within this of torch is served by BACKEND=auto
SCORE_SCALE = 20.0  # a score's allowed gap is this many times a vector's (1 - cosine)

PROBES = (  # agreement checks and int8 calibration: short and long, plain and technical
    "health check",
    "Most broken bones heal in six to eight weeks.",
    "Paris is the capital of France, and its museums are open every day of the week.",
    "A compound fracture needs surgery; recovery takes months of physiotherapy and rest.",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id LIMIT 10;",
    "The quarterly report shows revenue up 12% year over year, driven by cloud services.",
    "how do i reset my password if i no longer have access to the recovery email",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)


@dataclass(frozen=True, slots=True)
class Agreement:
    """How close answers are to float32 torch's on the probes: ``value`` 1.0 is identical."""

    value: float
    text: str
    largest: float = 0.0  # largest absolute difference: unit vectors, or raw logits
    kind: ModelKind = ModelKind.BI_ENCODER


def compare(kind: ModelKind, got: np.ndarray, want: np.ndarray) -> Agreement:
    """``got`` against the float32 reference ``want``: logits [n] or vectors [n, dim]."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return Agreement(0.0, f"non-finite output on {int((~np.isfinite(got)).sum())} values", np.inf, kind)
    if kind_of(kind).one_score:
        gap = float(np.abs(_sigmoid(got) - _sigmoid(want)).max())
        largest = float(np.abs(got - want).max())
        text = f"largest score difference {gap:.6f} over {len(got)} probes"
        return Agreement(1.0 - gap, text, largest, kind)
    got_unit = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    want_unit = want / np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)
    cosine = float((got_unit * want_unit).sum(axis=1).min())
    largest = float(np.abs(got_unit - want_unit).max())
    text = f"worst cosine {cosine:.6f} over {len(got)} probes"
    return Agreement(cosine, text, largest, kind)


def meets_half_floor(agreement: Agreement, floor: float) -> bool:
    """Whether half precision is close enough to float32 to serve (see the module docstring)."""
    if kind_of(agreement.kind).one_score:
        return 1.0 - agreement.value <= SCORE_SCALE * (1.0 - floor)
    return agreement.value >= floor


def half_floor_text(kind: ModelKind, floor: float) -> str:
    if kind_of(kind).one_score:
        return f"a largest score difference of {SCORE_SCALE * (1.0 - floor):.4f}"
    return f"a worst cosine of {floor}"


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))
