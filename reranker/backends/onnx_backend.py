"""ONNX Runtime backend: the model exported once from PyTorch, then run by onnxruntime.

The export (``torch.onnx.export``, TorchScript exporter, opset 17, dynamic batch and
sequence axes) covers the whole path our torch backend runs - transformer, pooling,
and the cross-encoder head - so both backends return the same thing: logits [n] or
pooled vectors [n, dim] before normalisation. The file is cached in ONNX_CACHE_DIR
under a hash of the model's files and the export settings; ONNX_QUANTIZE=int8 adds
onnxruntime's transformer optimizer and dynamic int8 quantization (onnx_quantize.py,
also cached). A model that ships its own ONNX file (``onnx/model.onnx``) is run as it is.
The export uses eager attention so that the optimizer recognises it. CUDA is used when
onnxruntime has its execution provider and DEVICE_PREFERENCE allows it. Every load
compares the file's answers with torch's on a few probes (``agreement``).
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

from reranker.backends.base import Backend, Encoded, ModelInfo, ModelKind
from reranker.backends.onnx_quantize import quantize_int8
from reranker.backends.source import ModelSource, module_list, pooling_of
from reranker.backends.tokenization import TextTokenizer, TokenizedBackend

if TYPE_CHECKING:
    from reranker.backends.torch_backend import TorchBackend

log = logging.getLogger(__name__)

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _model_hash(source: ModelSource, shipped: Path | None) -> str:
    """Hash of the model's files and the export settings: the cache key of the exported files
    (a shipped ONNX file is part of it, since it is what int8 is made from)."""
    import torch

    digest = hashlib.sha256(
        f"opset={OPSET}|torch={torch.__version__}|attention=eager|int8=fused+outliers10".encode()
    )
    for path in sorted(p for p in Path(source.path).rglob("*") if p.is_file()):
        if (path.suffix in (".onnx", ".md") and path != shipped) or ".git" in path.parts:
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


def shipped_onnx(root: Path) -> Path | None:
    """The model's own ONNX file (``onnx/model.onnx`` as sentence-transformers and Optimum
    save it, or ``model.onnx``), when its module list is one we can finish in numpy:
    Transformer, then Pooling (mean or CLS) and Normalize for a bi-encoder."""
    candidates = [root / "onnx" / "model.onnx", root / "model.onnx"]
    found = next((path for path in candidates if path.is_file()), None)
    extra = [m.get("type", "") for m in module_list(root) if not m.get("type", "").endswith(_POOLED)]
    if found is not None and extra:
        log.info("not using %s: the model also has %s, exporting the whole model instead", found, extra)
        return None
    return found


_POOLED = ("Transformer", "Pooling", "Normalize")
PROBES = (  # agreement check and int8 calibration: short and long, plain and technical
    "health check",
    "Most broken bones heal in six to eight weeks.",
    "Paris is the capital of France, and its museums are open every day of the week.",
    "A compound fracture needs surgery; recovery takes months of physiotherapy and rest.",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id LIMIT 10;",
    "The quarterly report shows revenue up 12% year over year, driven by cloud services.",
    "how do i reset my password if i no longer have access to the recovery email",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)
MIN_COSINE = 0.98  # bi-encoder: worst probe vector against torch
MAX_SCORE_GAP = 0.05  # cross-encoder: largest sigmoid(logit) difference against torch


class OnnxBackend(TokenizedBackend):
    def __init__(self, source: ModelSource, cache_dir: Path, quantize: str, device: str) -> None:
        import onnxruntime as ort

        from reranker.backends.torch_backend import TorchBackend

        self._source = source
        self._quantize = quantize
        reference = TorchBackend(source, "cpu")  # loading, tokenizer, model facts; export on a miss
        self._info = reference.info()
        self.tokenizer = reference.tokenizer
        shipped = shipped_onnx(Path(source.path))
        self.origin = "shipped" if shipped else "exported"
        key = _model_hash(source, shipped)
        fp32 = shipped or cache_dir / f"{key}-fp32.onnx"
        self.exported = not fp32.exists()
        if self.exported:
            log.info("exporting %s to ONNX (%s)", source.name, fp32)
            _atomic(lambda path: _export(reference, path), fp32)
        path = fp32
        if quantize == "int8":
            path = cache_dir / f"{key}-int8.onnx"
            if not path.exists():
                log.info("quantizing %s to int8 (%s)", source.name, path)
                probes = self.tokenizer.collate(self.tokenizer.texts(PROBES))
                _atomic(lambda out: quantize_int8(fp32, out, reference.module, probes), path)
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(path), providers=providers)
        self._inputs = [i.name for i in self._session.get_inputs()]  # unused inputs are dropped on export
        self._output = _output_name(self._session, source.kind)
        self._pooling = pooling_of(Path(source.path), "ONNX backend")[0] if shipped else None
        self.path = path
        self._device = "cuda" if self._session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.agreement, self.agrees = self._compare_with(reference)

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
            details={
                "onnx_file": str(self.path),
                "onnx_origin": self.origin,
                "opset": str(OPSET),
                "agreement_with_torch": self.agreement,
            },
        )

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        arrays = self.tokenizer.collate(batch)
        (output,) = self._session.run([self._output], {name: arrays[name] for name in self._inputs})
        output = np.asarray(output, dtype=np.float32)
        if self._source.kind is ModelKind.CROSS_ENCODER:
            return output.reshape(len(batch), -1)[:, 0]
        if output.ndim == 3:  # a shipped transformer: token embeddings, pooled here
            if self._pooling == "cls":
                return output[:, 0]
            weights = arrays["attention_mask"][:, :, None].astype(np.float32)
            return (output * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return output

    def _compare_with(self, reference: Backend) -> tuple[str, bool]:
        """How close this file's answers are to the torch model's on a few probes (int8 drifts)."""
        if self._source.kind is ModelKind.CROSS_ENCODER:
            items = reference.tokenize_pairs([(PROBES[0], text) for text in PROBES])
            gap = float(np.abs(_sigmoid(self.forward(items)) - _sigmoid(reference.forward(items))).max())
            return f"largest score difference {gap:.4f} over {len(items)} probes", gap <= MAX_SCORE_GAP
        items = reference.tokenize_texts(PROBES)
        got, want = self.forward(items), reference.forward(items)
        cosine = float(
            ((got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)).min()
        )
        return f"worst cosine {cosine:.4f} over {len(items)} probes", cosine >= MIN_COSINE


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _output_name(session: object, kind: ModelKind) -> str:
    """Ours is "output"; shipped files name theirs (logits, sentence_embedding, last_hidden_state)."""
    names = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
    preferred = ("output", "logits") if kind is ModelKind.CROSS_ENCODER else ("output", "sentence_embedding")
    preferred += ("last_hidden_state", "token_embeddings")
    return next((name for name in preferred if name in names), names[0])
