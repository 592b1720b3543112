"""Classifiers: one logit per label for a text or a (text, text) pair, named by ``id2label``.

A sequence-classification model with more than one label, or a one-label model under
MODEL_TASK=classify (``for_task`` decides: its files declare a cross-encoder either way). Scores
are a softmax over the labels, or a sigmoid per label (one label, or multi-label models)."""

from __future__ import annotations

from typing import Any

import numpy as np

from reranker.kinds.base import Kind, ModelKind


class Classifier(Kind):
    name = ModelKind.CLASSIFIER
    capabilities = ("classify",)
    inputs = "either"
    output = "labels"
    does = "labels texts"
    sentence_transformers_class = "CrossEncoder"
    labels = True
    onnx_output_names = ("output", "logits")

    def torch_output(self, features: dict[str, Any]) -> Any:
        scores = features["scores"]
        return scores if scores.dim() == 2 else scores.unsqueeze(-1)  # [n, labels], traceable


def label_scores(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """A classifier's scores from its logits, as transformers' pipeline and TEI compute them:
    a sigmoid per label for one label or multi-label models, else a softmax over the labels."""
    if multi_label or logits.shape[1] == 1:
        return sigmoid(logits)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
