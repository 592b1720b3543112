"""PyTorch backend: sentence-transformers models on CUDA, MPS or CPU, in float32 or half precision.

sentence-transformers loads the model (so hub ids, local copies and both kinds
work as they do in-process); tokenization and padding are ours so that each item
is tokenized once and batches are formed by the controller.

Half precision (``dtype`` bfloat16 or float16) converts the transformer only: its output is
upcast to float32 before anything else runs, so pooling, Dense layers, a causal-LM
reranker's yes/no logit difference (LogitScore), normalisation, the activation and the
ranking all compute in float32. The model loads in float32, answers the probe texts
(agreement.py), is converted, and answers them again: ``half_agreement`` is how close the
two are, which the factory holds to HALF_PRECISION_MIN_AGREEMENT.

On CUDA: attention through PyTorch's SDPA kernels (flash-attention-2 when the
``flash_attn`` package is installed and the precision is half), inputs copied from pinned
host memory without blocking, TF32 off in float32 (so float32 means float32), device
memory in ``info().details``, and a larger default batch (``preferred_batch_size``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from reranker.backends.agreement import PROBES, Agreement, compare
from reranker.backends.base import Encoded, ModelInfo
from reranker.backends.source import ModelSource, layout_facts
from reranker.backends.templates import CAUSAL_TEMPLATES
from reranker.backends.tokenization import TextTokenizer, TokenizedBackend
from reranker.errors import StartupError
from reranker.kinds import kind_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUDA_BATCH_SIZE = 128  # the default batch on a GPU (BATCH_SIZE unset); MAX_BATCH_TOKENS still caps it
# Half precision pads a batch to a multiple of this many tokens. oneDNN compiles its bfloat16 kernels
# for each shape (a shape's first batch ran 25-50% slower here, float32's did not), and GPU tensor
# cores want multiples of 8: far fewer distinct shapes, so the kernels stay compiled.
HALF_PAD_MULTIPLE = 8


def attention_kwargs(device: str, dtype: str) -> dict[str, Any]:
    """The attention kernels to ask transformers for: SDPA on CUDA (flash-attention-2 when it is
    installed and the precision is half, which it requires); the library's default elsewhere."""
    if device != "cuda":
        return {}
    if dtype != "float32" and importlib.util.find_spec("flash_attn") is not None:
        return {"attn_implementation": "flash_attention_2"}
    return {"attn_implementation": "sdpa"}


def cuda_memory_details(cuda: Any, device: torch.device) -> dict[str, str]:
    """Device memory for /health: what torch holds now and at most, and the device's total."""
    mib = 1024**2
    total = cuda.get_device_properties(device).total_memory
    return {
        "device_memory_allocated_mib": str(round(cuda.memory_allocated(device) / mib)),
        "device_memory_reserved_mib": str(round(cuda.memory_reserved(device) / mib)),
        "device_memory_peak_mib": str(round(cuda.max_memory_allocated(device) / mib)),
        "device_memory_total_mib": str(round(total / mib)),
    }


class TorchBackend(TokenizedBackend):
    def __init__(self, source: ModelSource, device: str, dtype: str = "float32") -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a server log is no terminal
        self._source = source
        self._device = torch.device(device)
        self._dtype = DTYPES[dtype]
        self.half_agreement: Agreement | None = None  # set below for half precision
        self.preferred_batch_size = CUDA_BATCH_SIZE if self._device.type == "cuda" else None
        if self._device.type == "cuda" and dtype == "float32":
            torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
            torch.backends.cudnn.allow_tf32 = False
        self._model_kwargs = attention_kwargs(self._device.type, dtype)
        self._kind = kind_of(source.kind)
        loaders = {
            "SentenceTransformer": self._load_bi_encoder,
            "CrossEncoder": self._load_cross_encoder,
            "SparseEncoder": self._load_sparse_encoder,
        }
        loaders[self._kind.sentence_transformers_class]()
        self._model.eval()
        layout = source.layout
        for limit in (
            layout.position_limit,
            source.max_length_cap,
        ):  # what the model can take; MAX_MODEL_LENGTH
            if limit:
                self._max_length = min(self._max_length, limit)
        self._template = CAUSAL_TEMPLATES[layout.family] if layout.causal_lm else None
        self.tokenizer = TextTokenizer(
            self._model.tokenizer,
            self._max_length,
            token_types=layout.uses_token_types,
            padding_side="left" if layout.causal_lm else layout.padding_side,
            template=self._template,
        )
        if self._dtype is not torch.float32:
            self.tokenizer.pad_multiple = HALF_PAD_MULTIPLE  # before the probes: they measure what runs
            self.half_agreement = self._to_half_precision()

    def _to_half_precision(self) -> Agreement:
        """Convert the transformer to ``self._dtype``; how close it stays to float32 on the probes."""
        probes = self._kind.probe_inputs(self, PROBES)
        dtype, self._dtype = self._dtype, torch.float32
        reference = self.forward(probes)
        self._layers[0].to(dtype)  # the transformer; pooling and heads after it stay float32
        self._dtype = dtype
        return compare(self._kind.name, self.forward(probes), reference)

    def _load_bi_encoder(self) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules.normalize import Normalize

        layout = self._source.layout
        if not layout.pooling_includes_prompt and any(layout.prompts.values()):
            raise StartupError(
                f"model {self._source.name} leaves its prompt out of pooling (include_prompt: false), "
                "which this server does not do; serve it with sentence-transformers"
            )
        model = SentenceTransformer(
            str(self._source.path),
            device=str(self._device),
            local_files_only=True,
            trust_remote_code=self._source.trust_remote_code,
            model_kwargs=self._model_kwargs or None,
        )
        modules = list(model.children())
        # Normalisation is post-processing (per request), so run everything before it.
        self._layers = [m for m in modules if not isinstance(m, Normalize)]
        self._normalizes = len(self._layers) != len(modules)
        self._model = model
        self._max_length = int(model.max_seq_length or 512)
        self._dimension = int(model.get_embedding_dimension() or 0)

    def _load_cross_encoder(self) -> None:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(
            str(self._source.path),
            device=str(self._device),
            local_files_only=True,
            trust_remote_code=self._source.trust_remote_code,
            model_kwargs=self._model_kwargs or None,
        )
        if model.num_labels != 1 and self._kind.one_score:
            raise StartupError(
                f"model {self._source.name} has {model.num_labels} labels: a classifier, not a reranker "
                "(MODEL_TASK=rerank asks for one); serve it with MODEL_TASK=auto on /predict"
            )
        self._layers = list(model.children())
        self._normalizes = False
        self._model = model
        self._max_length = int(model.max_length or self._source.layout.position_limit or 512)
        self._dimension = None

    def _load_sparse_encoder(self) -> None:
        """A SPLADE model (MLMTransformer + SpladePooling): one vocabulary-sized vector per text."""
        from sentence_transformers import SparseEncoder

        model = SparseEncoder(
            str(self._source.path),
            device=str(self._device),
            local_files_only=True,
            trust_remote_code=self._source.trust_remote_code,
            model_kwargs=self._model_kwargs or None,
        )
        first = model[0]
        if self._source.layout.inference_free:  # a Router: documents through the model, queries a table
            self._layers = list(first.sub_modules["document"])
            (static,) = first.sub_modules["query"]
            self.query_weights = static.weight.detach().float().cpu().numpy()
        else:
            self._layers = list(model.children())
        self._normalizes = False
        self._model = model
        self._max_length = int(model.max_seq_length or self._source.layout.declared_max_length or 512)
        self._dimension = int(model.get_embedding_dimension() or 0)

    def info(self) -> ModelInfo:
        details = {"half_precision_agreement": self.half_agreement.text} if self.half_agreement else {}
        if self.tokenizer.pad_multiple > 1:
            details["padding"] = f"batches padded to a multiple of {self.tokenizer.pad_multiple} tokens"
        if self.query_weights is not None:
            details["inference_free"] = "queries: the static token-weight table, no model run"
        if self._device.type == "cuda":
            details |= cuda_memory_details(torch.cuda, self._device)
        return ModelInfo(
            name=self._source.name,
            kind=self._source.kind,
            backend="torch",
            device=str(self._device),
            max_length=self._max_length,
            dimension=self._dimension,
            normalize_embeddings=self._normalizes,
            dtype=str(self._dtype).removeprefix("torch."),
            details=details,
            **layout_facts(self._source),
        )

    @torch.inference_mode()
    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        arrays = self.tokenizer.collate(batch)
        if self._device.type == "cuda":  # pinned host memory: the copy runs without blocking
            features = {
                name: torch.from_numpy(array).pin_memory().to(self._device, non_blocking=True)
                for name, array in arrays.items()
            }
        else:
            features = {name: torch.from_numpy(array).to(self._device) for name, array in arrays.items()}
        return self.run_layers(features).float().cpu().numpy()

    @property
    def serves_token_vectors(self) -> bool:  # type: ignore[override]
        return self._kind.token_vectors and self._template is None

    @torch.inference_mode()
    def token_vectors(self, batch: Sequence[Encoded]) -> np.ndarray:
        """Per item, the transformer's last hidden state of each of its tokens, padding left out."""
        arrays = self.tokenizer.collate(batch)
        mask = arrays["attention_mask"].astype(bool)
        features = {name: torch.from_numpy(array).to(self._device) for name, array in arrays.items()}
        hidden = self._layers[0](features)["token_embeddings"].float().cpu().numpy()
        answer = np.empty(len(batch), dtype=object)
        for row, (states, keep) in enumerate(zip(hidden, mask, strict=True)):
            answer[row] = np.ascontiguousarray(states[keep])
        return answer

    @property
    def module(self) -> torch.nn.Module:
        """The loaded sentence-transformers model (for exporters)."""
        return self._model

    def run_layers(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model from token ids to its output: logits [n] (a reranker), [n, labels] (a
        classifier), or pooled vectors [n, dim] (vocabulary-sized for a sparse model)."""
        if self._template is not None:  # a causal LM reranker: the logits of the last position only
            features = {**features, "logits_to_keep": 1}
            features.pop("token_type_ids", None)
        for position, layer in enumerate(self._layers):
            features = layer(features)
            if position == 0 and self._dtype is not torch.float32:
                features = upcast(features)  # everything after the transformer runs on float32
        return self._kind.torch_output(features)


def upcast(features: dict[str, Any]) -> dict[str, Any]:
    """Every half-precision tensor of ``features`` as float32 (token ids and masks unchanged)."""
    return {
        name: value.float()
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16)
        else value
        for name, value in features.items()
    }
