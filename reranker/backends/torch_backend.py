"""PyTorch backend: sentence-transformers models on CUDA, MPS or CPU.

sentence-transformers loads the model (so hub ids, local copies and both kinds
work as they do in-process); tokenization and padding are ours so that each item
is tokenized once and batches are formed by the controller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from reranker.backends.base import Encoded, ModelInfo, ModelKind
from reranker.backends.source import ModelSource
from reranker.backends.tokenization import TextTokenizer, TokenizedBackend
from reranker.errors import StartupError


class TorchBackend(TokenizedBackend):
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
        self.tokenizer = TextTokenizer(self._model.tokenizer, self._max_length)

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

    @torch.inference_mode()
    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        arrays = self.tokenizer.collate(batch)
        features = {name: torch.from_numpy(array).to(self._device) for name, array in arrays.items()}
        return self.run_layers(features).float().cpu().numpy()

    @property
    def module(self) -> torch.nn.Module:
        """The loaded sentence-transformers model (for exporters)."""
        return self._model

    def run_layers(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model from token ids to its output: logits [n] or pooled vectors [n, dim]."""
        for layer in self._layers:
            features = layer(features)
        if self._source.kind is ModelKind.CROSS_ENCODER:
            return features["scores"].reshape(-1)
        return features["sentence_embedding"]
