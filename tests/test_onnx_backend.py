"""BACKEND=onnx: the exported model answers like the torch one (parity, batch invariance, cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reranker.backends.factory import create_backend
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import make_settings

pytest.importorskip("onnxruntime", reason="BACKEND=onnx needs onnxruntime (requirements-backends.txt)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def backends(cache_dir: Path, quantize: str = "none", **model: str):
    settings = make_settings(onnx_cache_dir=str(cache_dir), onnx_quantize=quantize, **model)
    torch_backend = create_backend(settings.model_copy(update={"backend": "torch"}))
    return torch_backend, create_backend(settings.model_copy(update={"backend": "onnx"}))


def test_export_is_cached_and_reused(cache_dir: Path) -> None:
    _, first = backends(cache_dir)
    _, second = backends(cache_dir)
    assert not second.exported and second.path == first.path and first.path.parent == cache_dir


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(np.float64)


def test_int8_vectors_stay_close_and_keep_the_ranking(cache_dir: Path) -> None:
    reference, int8 = backends(cache_dir, quantize="int8")
    assert int8.info().dtype == "int8"
    items = int8.tokenize_texts([QUERY, *TEXTS])
    got, want = int8.forward(items), reference.forward(items)
    cosines = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.mean() >= 0.99, cosines
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    scores_int8 = unit(got)[1:] @ unit(got)[0]
    scores_fp32 = unit(want)[1:] @ unit(want)[0]
    spearman = np.corrcoef(ranks(scores_int8), ranks(scores_fp32))[0, 1]
    assert spearman >= 0.95, spearman
