"""Cross-encoders (rerankers): one logit per (query, document) pair, a sequence classifier with
one label (sentence-transformers ``CrossEncoder``) or a causal LM scored by its yes/no logits
(Qwen3-Reranker). A long document's score is its best window's."""

from __future__ import annotations

from typing import Any

import numpy as np

from reranker.kinds.base import DeclaredFiles, Kind, ModelKind
from reranker.kinds.classifier import sigmoid

SCORING_ARCHITECTURES = ("ForSequenceClassification", "ForCausalLM")


class CrossEncoder(Kind):
    name = ModelKind.CROSS_ENCODER
    capabilities = ("rerank",)
    inputs = "pairs"
    output = "score"
    does = "scores pairs"
    sentence_transformers_class = "CrossEncoder"
    rerank_by = "pairs"
    on_mlx = True
    onnx_output_names = ("output", "logits")

    def declared(self, files: DeclaredFiles) -> bool:
        return files.sentence_transformers_type == "CrossEncoder"

    def inferred(self, files: DeclaredFiles) -> bool:
        return any(arch.endswith(SCORING_ARCHITECTURES) for arch in files.architectures)

    def torch_output(self, features: dict[str, Any]) -> Any:
        return features["scores"].reshape(-1)

    def onnx_output(self, output: np.ndarray, items: int) -> np.ndarray:
        return output.reshape(items, -1)[:, 0]


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """A cross-encoder's score from its logit, by the activation the model declares."""
    if activation == "identity":
        return logits.astype(np.float32)
    if activation == "softmax":  # over one logit: 1.0 (what sentence-transformers returns)
        return np.ones_like(logits, dtype=np.float32)
    if activation == "tanh":
        return np.tanh(logits.astype(np.float64)).astype(np.float32)
    return sigmoid(logits)
