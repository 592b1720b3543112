"""Model kinds: one strategy object per kind (``kind_of``), chosen once when a model loads.

A new kind is a module here (a ``Kind`` subclass) and its line in ``KINDS``, plus the routes
that serve its capability (reranker/api/) and its tests.
"""

from __future__ import annotations

from reranker.kinds.base import DeclaredFiles, Kind, ModelKind
from reranker.kinds.bi_encoder import BiEncoder
from reranker.kinds.classifier import Classifier
from reranker.kinds.cross_encoder import CrossEncoder
from reranker.kinds.sparse import Sparse

# In the order detection asks them (the first that claims a model's files wins; sparse before
# bi-encoder: SpladePooling is a pooling module too). The default is a bi-encoder.
KINDS: dict[ModelKind, Kind] = {
    kind.name: kind for kind in (CrossEncoder(), Sparse(), BiEncoder(), Classifier())
}
DEFAULT = ModelKind.BI_ENCODER


def kind_of(kind: ModelKind | str) -> Kind:
    return KINDS[ModelKind(kind)]


def detect(files: DeclaredFiles) -> ModelKind:
    """The kind a model's files declare, else the one its architecture implies, else a bi-encoder."""
    for ask in ("declared", "inferred"):
        for kind in KINDS.values():
            if getattr(kind, ask)(files):
                return kind.name
    return DEFAULT


def for_task(kind: ModelKind, task: str, labels: int, causal_lm: bool) -> ModelKind | None:
    """The kind served for MODEL_TASK (auto, rerank, classify): a sequence classifier with several
    labels is a classifier unless the task is rerank (the backend then refuses it, naming the
    fix); a one-label one is a classifier under classify. None: classify asked of a model that
    is no sequence classifier."""
    if kind is ModelKind.CROSS_ENCODER and not causal_lm:
        if (labels > 1 and task != "rerank") or task == "classify":
            return ModelKind.CLASSIFIER
        return kind
    return None if task == "classify" else kind


__all__ = ["KINDS", "DeclaredFiles", "Kind", "ModelKind", "detect", "for_task", "kind_of"]
