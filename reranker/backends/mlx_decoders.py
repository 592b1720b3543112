"""Decoder (Qwen2 / Qwen3) models on MLX through mlx-lm's own model implementations.

mlx-lm builds the backbone (embeddings, causal layers, final RMSNorm) from config.json;
we load the checkpoint's tensors into it and read the state of one token per item:

- sequence classification (Qwen3 rerankers converted to ``*ForSequenceClassification``):
  the ``score`` linear at the last non-padding token, as transformers picks it;
- a causal LM scored by "yes" against "no" (Qwen3-Reranker): ``logit(yes) - logit(no)`` at the
  last token, whose sigmoid is softmax([no, yes])[yes], the probability Qwen3-Reranker reports;
- last-token pooling (Qwen3-Embedding): the final state of the last real token.

Inputs are right-padded: under the causal mask no real token sees the padding after it,
and positions count from 0 as they do unpadded, so an item's answer does not depend on
its batch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from reranker.backends.mlx_layers import load_weights
from reranker.errors import StartupError

DECODER_FAMILIES = ("qwen2", "qwen3")
HEAD_WEIGHTS = ("score.weight", "lm_head.weight")


class Decoder:
    def __init__(self, root: Path, config: dict[str, Any], dtype: mx.Dtype = mx.float32) -> None:
        family = str(config.get("model_type"))
        if config.get("quantization") or config.get("quantization_config"):
            raise StartupError(
                "MLX backend: quantized checkpoints are not served (exact float32 only); use BACKEND=torch"
            )
        try:
            module = importlib.import_module(f"mlx_lm.models.{family}")
        except ImportError:
            raise StartupError(
                f"MLX backend: {family} models run through mlx-lm: pip install -r requirements-backends.txt"
            ) from None
        args = module.ModelArgs.from_dict(_with_rope_theta(config))
        self.family = family
        self.width = int(config["hidden_size"])
        self.pad_id = config.get("pad_token_id")
        self.tied = bool(config.get("tie_word_embeddings", False))
        weights = load_weights(root, ("model.",), dtype)
        self.heads = {name: weights.pop(name) for name in HEAD_WEIGHTS if name in weights}
        self.backbone = module.Model(args).model
        self.backbone.set_dtype(dtype)
        try:
            self.backbone.load_weights(list(weights.items()), strict=True)
        except ValueError as exc:
            raise StartupError(
                f"MLX backend: the {family} checkpoint does not match its config: {exc}"
            ) from None
        mx.eval(self.backbone.parameters())

    def last_states(self, ids: mx.array, lengths: np.ndarray, skip_padding_ids: bool = False) -> mx.array:
        """The final hidden state [batch, width] at each item's last real token, or with
        ``skip_padding_ids`` at its last token that is not the pad id (transformers'
        sequence-classification rule)."""
        hidden = self.backbone(ids)
        index = lengths - 1
        if skip_padding_ids and self.pad_id is not None:
            ids_np = np.array(ids)
            real = (ids_np != int(self.pad_id)) & (np.arange(ids_np.shape[1])[None, :] < lengths[:, None])
            index = np.where(real.any(axis=1), (real * np.arange(ids_np.shape[1])[None, :]).argmax(axis=1), 0)
        return hidden[mx.arange(hidden.shape[0]), mx.array(index.astype(np.int32))]

    def score_head(self) -> mx.array:
        if "score.weight" not in self.heads:
            raise StartupError("MLX backend: the sequence-classification checkpoint has no score.weight")
        return self.heads["score.weight"]

    def vocabulary_rows(self, token_ids: list[int]) -> mx.array:
        """The language-model head's rows for ``token_ids`` (tied to the embeddings where declared)."""
        if "lm_head.weight" in self.heads:
            table = self.heads["lm_head.weight"]
        elif self.tied:
            table = self.backbone.embed_tokens.weight
        else:
            raise StartupError("MLX backend: the causal LM has no lm_head.weight and does not tie embeddings")
        return table[mx.array(token_ids)]


def _with_rope_theta(config: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 nests rope_theta under rope_parameters; mlx-lm's Qwen2 reads it flat."""
    nested = (config.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" not in config and nested is not None:
        return {**config, "rope_theta": nested}
    return config
