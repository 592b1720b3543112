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
from reranker.backends.source import ModelSource, layout_facts
from reranker.backends.templates import CAUSAL_TEMPLATES
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
        layout = source.layout
        if source.max_length_cap:
            self._max_length = min(self._max_length, source.max_length_cap)
        self._template = CAUSAL_TEMPLATES[layout.family] if layout.causal_lm else None
        self.tokenizer = TextTokenizer(
            self._model.tokenizer,
            self._max_length,
            token_types=layout.uses_token_types,
            padding_side="left" if layout.causal_lm else layout.padding_side,
            template=self._template,
        )

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
            str(self._source.path), device=str(self._device), local_files_only=True, trust_remote_code=False
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

        model = CrossEncoder(str(self._source.path), device=str(self._device), local_files_only=True)
        self._model = model  # (for the error below)
        if model.num_labels != 1:
            raise StartupError(
                f"model {self._source.name} has {model.num_labels} labels; only single-label "
                "cross-encoders (rerankers) can be served"
            )
        self._layers = list(model.children())
        self._normalizes = False
        self._model = model
        self._max_length = int(model.max_length or self._source.layout.position_limit or 512)
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
            **layout_facts(self._source),
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
        if self._template is not None:  # a causal LM reranker: the logits of the last position only
            features = {**features, "logits_to_keep": 1}
            features.pop("token_type_ids", None)
        for layer in self._layers:
            features = layer(features)
        if self._source.kind is ModelKind.CROSS_ENCODER:
            return features["scores"].reshape(-1)
        return features["sentence_embedding"]
