"""BACKEND=onnx: export cache and a model's own shipped ONNX file (int8: test_int8.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from reranker.backends.factory import FP32_MIN_AGREEMENT, create_backend
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import make_settings

pytest.importorskip("onnxruntime", reason="BACKEND=onnx needs onnxruntime (requirements-backends.txt)")


def backends(onnx_cache: Path, quantize: str = "none", **model: str):
    settings = make_settings(onnx_cache_dir=str(onnx_cache), onnx_quantize=quantize, **model)
    torch_backend = create_backend(settings.model_copy(update={"backend": "torch"}))
    return torch_backend, create_backend(settings.model_copy(update={"backend": "onnx"}))


def test_export_is_cached_and_reused(tmp_path: Path) -> None:
    _, first = backends(tmp_path)
    _, second = backends(tmp_path)
    assert first.exported and not second.exported
    assert second.path == first.path and first.path.parent == tmp_path


def ship_onnx(model_dir: Path, target: Path, cross_encoder: bool) -> Path:
    """A copy of the model with its own onnx/model.onnx, the transformer alone, as Optimum ships
    it: last_hidden_state for a bi-encoder (pooling is left to the server), logits for a reranker."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    shutil.copytree(model_dir, target)
    loader = AutoModelForSequenceClassification if cross_encoder else AutoModel
    model = loader.from_pretrained(str(target), attn_implementation="eager").eval()
    inputs = AutoTokenizer.from_pretrained(str(target))(
        ["shipped", "an onnx file"], padding=True, return_tensors="pt"
    )
    names = ["input_ids", "attention_mask", "token_type_ids"]
    output = "logits" if cross_encoder else "last_hidden_state"
    (target / "onnx").mkdir()

    class Transformer(torch.nn.Module):  # keyword arguments: the positional order varies by version
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, tensors, strict=True)))[output]

    with torch.no_grad():
        torch.onnx.export(
            Transformer().eval(),
            tuple(inputs[name] for name in names),
            str(target / "onnx" / "model.onnx"),
            input_names=names,
            output_names=[output],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in [*names, output]},
            opset_version=17,
            dynamo=False,
        )
    return target


@pytest.mark.parametrize("kind", ["bi-encoder", "cross-encoder"])
def test_a_shipped_onnx_file_is_loaded_directly_and_answers_like_torch(
    kind: str, tmp_path: Path, embedded_path: Path, cross_encoder_path: Path
) -> None:
    cross = kind == "cross-encoder"
    model = ship_onnx(cross_encoder_path if cross else embedded_path, tmp_path / "model", cross)
    cache = tmp_path / "cache"
    reference, shipped = backends(cache, local_model_path=str(model))
    assert (shipped.origin, shipped.path) == ("shipped", model / "onnx" / "model.onnx")
    assert not cache.exists(), "nothing was exported"
    if cross:
        items = shipped.tokenize_pairs([(QUERY, text) for text in TEXTS])
    else:
        items = shipped.tokenize_texts([QUERY, *TEXTS])
    np.testing.assert_allclose(shipped.forward(items), reference.forward(items), atol=1e-4)
    np.testing.assert_allclose(shipped.forward(items[:1]), shipped.forward(items[:7])[:1], atol=1e-5)
    assert shipped.agreement.value >= FP32_MIN_AGREEMENT, shipped.agreement
    _, int8 = backends(cache, quantize="int8", local_model_path=str(model))  # refused if it disagrees
    assert int8.path.parent == cache and int8.info().details["onnx_origin"] == "shipped"
    assert int8.info().dtype == "int8"


def test_the_session_uses_the_threads_sized_for_this_process(onnx_cache: Path) -> None:
    import torch

    from reranker.backends import threads

    before = torch.get_num_threads()
    try:
        threads.configure(1)
        _, onnx = backends(onnx_cache)
        assert onnx._session.get_session_options().intra_op_num_threads == 1
        assert torch.get_num_threads() == 1
    finally:
        threads.configure(before)
