"""ONNX Runtime backend: the model exported once from PyTorch, then run by onnxruntime.

The export (``torch.onnx.export``, TorchScript exporter, opset 17, dynamic batch and
sequence axes) covers the whole path our torch backend runs - transformer, pooling,
and the cross-encoder head - so both backends return the same thing: logits [n] or
pooled vectors [n, dim] before normalisation. The file is cached in ONNX_CACHE_DIR
under a hash of the model's files and the export settings; ONNX_QUANTIZE=int8 adds
onnxruntime's transformer optimizer and dynamic int8 quantization with the settings of
this CPU (onnx_quantize.py, also cached). A model that ships its own ONNX file
(``onnx/model.onnx``) is run as it is. The export uses eager attention so that the
optimizer recognises it. CUDA is used when onnxruntime has its execution provider and
DEVICE_PREFERENCE allows it. Every load measures how far the file's answers are from
torch's on a few probes (``agreement``); the factory refuses int8 below
ONNX_INT8_MIN_AGREEMENT.

Dynamic int8 quantizes activations with one scale per input tensor, so in a batch one
text's answer would depend on the others (and on their padding): up to 0.03 in a vector
component on the embedded model. The int8 model therefore runs each item alone - its
answer depends on its own tokens only, as fp32's does - which measured no slower than
batches on 2 CPU cores (an item alone carries no padding: 164 against 144 TREC passages/s).
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

from reranker.backends.agreement import PROBES, Agreement, compare
from reranker.backends.base import Backend, Encoded, ModelInfo, ModelKind
from reranker.backends.onnx_quantize import Int8Profile, quantize_int8
from reranker.backends.source import ModelSource, pooling_of, read_layout
from reranker.backends.threads import intra_op_threads
from reranker.backends.tokenization import TextTokenizer, TokenizedBackend
from reranker.kinds import kind_of

if TYPE_CHECKING:
    import onnxruntime

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
    layout = read_layout(root)
    extra = [name for name in layout.module_types if name not in _POOLED]
    if layout.pooling_mode not in ("", "mean", "cls"):
        extra.append(f"{layout.pooling_mode} pooling")
    if layout.causal_lm:
        extra.append("causal-LM scoring")
    if found is not None and extra:
        log.info("not using %s: the model also has %s, exporting the whole model instead", found, extra)
        return None
    return found


_POOLED = ("Transformer", "Pooling", "Normalize")


class OnnxBackend(TokenizedBackend):
    def __init__(
        self,
        source: ModelSource,
        cache_dir: Path,
        device: str,
        int8: Int8Profile | None = None,
        reference: TorchBackend | None = None,
    ) -> None:
        """``reference``: the float32 torch backend on the CPU, when the caller has one loaded."""
        from reranker.backends.torch_backend import TorchBackend

        self._source = source
        self._int8 = int8
        reference = reference or TorchBackend(source, "cpu")  # tokenizer, model facts; export on a miss
        self._info = reference.info()
        self.tokenizer = reference.tokenizer
        self.query_weights = reference.query_weights  # inference-free sparse: the table, no model
        shipped = shipped_onnx(Path(source.path))
        self.origin = "shipped" if shipped else "exported"
        key = _model_hash(source, shipped)
        fp32 = shipped or cache_dir / f"{key}-fp32.onnx"
        self.exported = not fp32.exists()
        if self.exported:
            log.info("exporting %s to ONNX (%s)", source.name, fp32)
            _atomic(lambda path: _export(reference, path), fp32)
        path = fp32
        if int8 is not None:
            path = cache_dir / f"{key}-int8-{int8.name}.onnx"
            if not path.exists():
                log.info("quantizing %s to int8 for %s (%s)", source.name, int8.why, path)
                probes = self.tokenizer.collate(self.tokenizer.texts(PROBES))
                _atomic(lambda out: quantize_int8(fp32, out, reference.module, probes, int8), path)
        self._session = _session(path, device)
        self._inputs = [i.name for i in self._session.get_inputs()]  # unused inputs are dropped on export
        self._output = _output_name(self._session, source.kind)
        self._pooling = pooling_of(Path(source.path), "ONNX backend")[0] if shipped else None
        self.path = path
        self._device = "cuda" if self._session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.agreement = self._compare_with(reference)

    def info(self) -> ModelInfo:
        base = self._info
        int8 = (
            {} if self._int8 is None else {"int8_profile": self._int8.why, "int8_runs": "one item at a time"}
        )
        return ModelInfo(
            name=base.name,
            kind=base.kind,
            backend="onnx",
            device=self._device,
            max_length=base.max_length,
            dimension=base.dimension,
            normalize_embeddings=base.normalize_embeddings,
            dtype="float32" if self._int8 is None else "int8",
            family=base.family,
            activation=base.activation,
            prompts=base.prompts,
            default_prompt_name=base.default_prompt_name,
            instruction=base.instruction,
            labels=base.labels,
            multi_label=base.multi_label,
            details={
                "onnx_file": str(self.path),
                "onnx_origin": self.origin,
                "opset": str(OPSET),
                "agreement_with_torch": self.agreement.text,
            }
            | int8,
        )

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        if self._int8 is None or len(batch) < 2:
            return self._run(batch)
        return np.concatenate([self._run([item]) for item in batch])  # batch-invariant: see the docstring

    def _run(self, batch: Sequence[Encoded]) -> np.ndarray:
        arrays = self.tokenizer.collate(batch)
        (output,) = self._session.run([self._output], {name: arrays[name] for name in self._inputs})
        output = np.asarray(output, dtype=np.float32)
        if output.ndim == 3:  # a shipped transformer: token embeddings, pooled here
            if self._pooling == "cls":
                return output[:, 0]
            weights = arrays["attention_mask"][:, :, None].astype(np.float32)
            return (output * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return kind_of(self._source.kind).onnx_output(output, len(batch))

    def _compare_with(self, reference: Backend) -> Agreement:
        """How close this file's answers are to the torch model's on the probes (int8 drifts)."""
        items = kind_of(self._source.kind).probe_inputs(reference, PROBES)
        return compare(self._source.kind, self.forward(items), reference.forward(items))


def _session(path: Path, device: str) -> onnxruntime.InferenceSession:
    """The inference session of ``path``: CUDA first when asked for and available, else CPU."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    threads = intra_op_threads()  # from the CPUs this process may use (0: onnxruntime's default)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def _output_name(session: object, kind: ModelKind) -> str:
    """Ours is "output"; shipped files name theirs (logits, sentence_embedding, last_hidden_state)."""
    names = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
    preferred = (*kind_of(kind).onnx_output_names, "last_hidden_state", "token_embeddings")
    return next((name for name in preferred if name in names), names[0])
