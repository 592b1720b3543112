"""Every optional backend answers like torch: parity and batch invariance on both model kinds.

The HTTP suite itself runs once per backend (``serving_backend`` in conftest.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from reranker.backends.factory import create_backend
from reranker.backends.source import resolve_model_source
from reranker.errors import StartupError
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import backend_param, make_settings

BACKENDS = [backend_param("onnx"), backend_param("mlx")]


def pair_of_backends(backend: str, onnx_cache: Path, **model: str):
    """torch and ``backend`` on the same model; ONNX in fp32 (int8 has its own closeness test)."""
    settings = make_settings(onnx_cache_dir=str(onnx_cache), onnx_quantize="none", **model)
    reference = create_backend(settings.model_copy(update={"backend": "torch"}))
    return reference, create_backend(settings.model_copy(update={"backend": backend}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bi_encoder_vectors_equal_torch_and_ignore_batch_company(backend: str, onnx_cache: Path) -> None:
    reference, other = pair_of_backends(backend, onnx_cache)
    assert (other.info().backend, other.info().dimension) == (backend, reference.info().dimension)
    items = other.tokenize_texts([QUERY, *TEXTS])
    assert [list(i.ids) for i in items] == [list(i.ids) for i in reference.tokenize_texts([QUERY, *TEXTS])]
    np.testing.assert_allclose(other.forward(items), reference.forward(items), rtol=0, atol=1e-5)
    alone = other.forward(items[:1])
    with_longer = other.forward([items[0], *items[3:9]])[:1]
    np.testing.assert_allclose(alone, with_longer, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_encoder_logits_equal_torch(backend: str, onnx_cache: Path, cross_encoder_path: Path) -> None:
    reference, other = pair_of_backends(backend, onnx_cache, local_model_path=str(cross_encoder_path))
    pairs = other.tokenize_pairs([(QUERY, text) for text in TEXTS])
    np.testing.assert_allclose(other.forward(pairs), reference.forward(pairs), rtol=0, atol=1e-5)
    np.testing.assert_allclose(other.forward(pairs[1:2]), other.forward(pairs[:6])[1:2], atol=1e-5)


@pytest.mark.parametrize(
    ("backend", "modules", "advice"),
    [("onnx", ["onnxruntime"], "pip install -r requirements.txt"), ("mlx", ["mlx", "mlx.core"], "mlx[cpu]")],
)
def test_a_missing_runtime_is_a_clear_start_up_error(
    backend: str, modules: list[str], advice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # what an environment without it looks like
    settings = make_settings(backend=backend)
    with pytest.raises(StartupError, match=re.escape(advice)):
        create_backend(settings, resolve_model_source(settings))
