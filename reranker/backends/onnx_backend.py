"""ONNX Runtime backend: the model exported once from PyTorch, then run by onnxruntime.

The export (``torch.onnx.export``, TorchScript exporter, opset 17, dynamic batch and
sequence axes) covers the whole path our torch backend runs - transformer, pooling,
and the cross-encoder head - so both backends return the same thing: logits [n] or
pooled vectors [n, dim] before normalisation. The file is cached in ONNX_CACHE_DIR
under a hash of the model's files and the export settings; ONNX_QUANTIZE=int8 adds
onnxruntime's transformer optimizer (fused attention, GELU, LayerNorm) and dynamic
int8 quantization of the weights, per channel (also cached). The export uses eager
attention so that the optimizer recognises it. CUDA is used
when onnxruntime has its execution provider and DEVICE_PREFERENCE allows it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from reranker.backends.base import Encoded, ModelInfo
from reranker.backends.source import ModelSource
from reranker.backends.tokenization import TextTokenizer, TokenizedBackend

if TYPE_CHECKING:
    from reranker.backends.torch_backend import TorchBackend

log = logging.getLogger(__name__)

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _model_hash(source: ModelSource) -> str:
    """Hash of the model's files and the export settings: the cache key of the exported files."""
    import torch

    digest = hashlib.sha256(f"opset={OPSET}|torch={torch.__version__}|attention=eager|int8=fused".encode())
    for path in sorted(p for p in Path(source.path).rglob("*") if p.is_file()):
        if path.suffix in (".onnx", ".md") or ".git" in path.parts:
            continue
        digest.update(str(path.relative_to(source.path)).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def _use_eager_attention(model: object) -> None:
    """Plain MatMul/Softmax attention in the graph: what onnxruntime's optimizer fuses into Attention."""
    for module in model.modules():  # type: ignore[attr-defined]
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        if hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"


def _export(reference: TorchBackend, target: Path) -> None:
    import torch

    _use_eager_attention(reference.module)

    class Exportable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = reference.module  # registered, so its weights become graph initializers

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            features = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
            }
            return reference.run_layers(features)

    tokenizer: TextTokenizer = reference.tokenizer
    sample = tokenizer.collate(tokenizer.texts(["export me", "a longer sample text"]))
    args = tuple(torch.from_numpy(sample[name]) for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"output": {0: "batch"}}
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            Exportable().eval(),
            args,
            str(target),
            input_names=list(INPUTS),
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _quantize_int8(fp32: Path, target: Path, heads: int, hidden: int) -> None:
    """Fuse attention, GELU and LayerNorm (onnxruntime's transformer optimizer), then dynamic int8
    weights with one scale per output channel (one per tensor loses too much accuracy here)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = fp32
    with tempfile.TemporaryDirectory() as work:
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            optimized = Path(work) / "optimized.onnx"
            fused = optimize_model(str(fp32), model_type="bert", num_heads=heads, hidden_size=hidden)
            fused.save_model_to_file(str(optimized))
            source = optimized
        except Exception as exc:  # noqa: BLE001 - an unfusable architecture is still quantizable
            log.warning("onnxruntime's optimizer could not fuse this model (%s); quantizing as is", exc)
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused ops lack shape info
        )


def _atomic(build: object, target: Path) -> None:
    """Write ``target`` through a temporary file in the same folder, so readers never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".onnx.tmp")
    os.close(handle)
    try:
        build(Path(temporary))  # type: ignore[operator]
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _attention_shape(model: object) -> tuple[int, int]:
    """(attention heads, hidden size) of the transformer, for the optimizer; (0, 0) lets it guess."""
    for module in model.modules():  # type: ignore[attr-defined]
        config = getattr(module, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if heads and hidden:
            return int(heads), int(hidden)
    return 0, 0


class OnnxBackend(TokenizedBackend):
    def __init__(self, source: ModelSource, cache_dir: Path, quantize: str, device: str) -> None:
        import onnxruntime as ort

        from reranker.backends.torch_backend import TorchBackend

        self._source = source
        self._quantize = quantize
        reference = TorchBackend(source, "cpu")  # loading, tokenizer, model facts; export on a miss
        self._info = reference.info()
        heads, hidden = _attention_shape(reference.module)
        self.tokenizer = reference.tokenizer
        key = _model_hash(source)
        fp32 = cache_dir / f"{key}-fp32.onnx"
        self.exported = not fp32.exists()
        if self.exported:
            log.info("exporting %s to ONNX (%s)", source.name, fp32)
            _atomic(lambda path: _export(reference, path), fp32)
        path = fp32
        if quantize == "int8":
            path = cache_dir / f"{key}-int8.onnx"
            if not path.exists():
                log.info("quantizing %s to int8 (%s)", source.name, path)
                _atomic(lambda out: _quantize_int8(fp32, out, heads, hidden), path)
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(path), providers=providers)
        self._inputs = [i.name for i in self._session.get_inputs()]  # unused inputs are dropped on export
        self.path = path
        self._device = "cuda" if self._session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def info(self) -> ModelInfo:
        base = self._info
        return ModelInfo(
            name=base.name,
            kind=base.kind,
            backend="onnx",
            device=self._device,
            max_length=base.max_length,
            dimension=base.dimension,
            normalize_embeddings=base.normalize_embeddings,
            dtype="int8" if self._quantize == "int8" else "float32",
            details={"onnx_file": str(self.path), "opset": str(OPSET)},
        )

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        arrays = self.tokenizer.collate(batch)
        (output,) = self._session.run(None, {name: arrays[name] for name in self._inputs})
        return np.asarray(output, dtype=np.float32)
