"""PyTorch backend: sentence-transformers models on CUDA, MPS or CPU.

sentence-transformers loads the model (so hub ids, local copies and both kinds
work as they do in-process); tokenization and padding are ours so that each item
is tokenized once and batches are formed by the controller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from reranker.backends.base import Backend, Encoded, ModelInfo, ModelKind
from reranker.backends.source import ModelSource
from reranker.errors import StartupError


def choose_device(preference: str) -> str:
    """CUDA > MPS > CPU for ``auto``; an unavailable explicit preference is an error."""
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if preference == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if preference == "cuda" and not cuda:
        raise StartupError("DEVICE_PREFERENCE=cuda but torch sees no CUDA device")
    if preference == "mps" and not mps:
        raise StartupError("DEVICE_PREFERENCE=mps but torch has no MPS (Apple GPU) support here")
    return preference


class TorchBackend(Backend):
    def __init__(self, source: ModelSource, device: str) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a server log is no terminal
        self._source = source
        self._device = torch.device(device)
        if source.kind is ModelKind.CROSS_ENCODER:
            self._load_cross_encoder()
        else:
            self._load_bi_encoder()
        self._model.eval()
        self._tokenizer = _plain_tokenizer(self._model.tokenizer, self._max_length)
        self._pad_id = int(self._model.tokenizer.pad_token_id or 0)

    def _load_bi_encoder(self) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules.normalize import Normalize

        model = SentenceTransformer(str(self._source.path), device=str(self._device), local_files_only=True)
        modules = list(model.children())
        # Normalisation is post-processing (per request), so run everything before it.
        self._layers = [m for m in modules if not isinstance(m, Normalize)]
        self._normalizes = len(self._layers) != len(modules)
        self._model = model
        self._max_length = int(model.max_seq_length or 512)
        self._dimension = int(model.get_embedding_dimension() or 0)

    def _load_cross_encoder(self) -> None:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(str(self._source.path), device=str(self._device), local_files_only=True)
        if model.num_labels != 1:
            raise StartupError(
                f"model {self._source.name} has {model.num_labels} labels; only single-label "
                "cross-encoders (rerankers) can be served"
            )
        self._layers = list(model.children())
        self._normalizes = False
        self._model = model
        self._max_length = int(model.max_length or 512)
        self._dimension = None

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self._source.name,
            kind=self._source.kind,
            backend="torch",
            device=str(self._device),
            max_length=self._max_length,
            dimension=self._dimension,
            normalize_embeddings=self._normalizes,
            dtype=str(next(self._model.parameters()).dtype).removeprefix("torch."),
        )

    def tokenize_texts(self, texts: Sequence[str]) -> list[Encoded]:
        return [_to_encoded(e) for e in self._tokenizer.encode_batch(list(texts))]

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        return [_to_encoded(e) for e in self._tokenizer.encode_batch([tuple(p) for p in pairs])]

    @torch.inference_mode()
    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        features = self._collate(batch)
        for layer in self._layers:
            features = layer(features)
        if self._source.kind is ModelKind.CROSS_ENCODER:
            return features["scores"].float().reshape(-1).cpu().numpy()
        return features["sentence_embedding"].float().cpu().numpy()

    def _collate(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(item) for item in batch)
        ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        type_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, item in enumerate(batch):
            n = len(item)
            ids[row, :n] = item.ids
            type_ids[row, :n] = item.type_ids
            mask[row, :n] = 1
        return {
            "input_ids": torch.from_numpy(ids).to(self._device),
            "token_type_ids": torch.from_numpy(type_ids).to(self._device),
            "attention_mask": torch.from_numpy(mask).to(self._device),
        }


def _plain_tokenizer(hf_tokenizer: object, max_length: int) -> Tokenizer:
    """A private copy of the fast tokenizer: truncation at max_length, no padding."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise StartupError("the model's tokenizer has no fast (Rust) implementation")
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
    return tokenizer


def _to_encoded(encoding: object) -> Encoded:
    return Encoded(
        ids=encoding.ids,  # type: ignore[attr-defined]
        type_ids=encoding.type_ids,  # type: ignore[attr-defined]
        truncated=bool(encoding.overflowing),  # type: ignore[attr-defined]
    )
