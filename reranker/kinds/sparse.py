"""Sparse (SPLADE) models: one vocabulary-sized weight vector per text, mostly zeros
(sentence-transformers ``SparseEncoder``: MLMTransformer + SpladePooling, or an inference-free
Router whose queries are weighted by a static table). A rerank scores by the dot product of
the weights, a long document by its best window's; weights are never normalised."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reranker.kinds.base import DeclaredFiles, Kind, ModelKind


class Sparse(Kind):
    name = ModelKind.SPARSE
    capabilities = ("embed_sparse", "rerank")
    inputs = "texts"
    output = "weights"
    does = "weights a vocabulary"
    sentence_transformers_class = "SparseEncoder"
    rerank_by = "vectors"

    def declared(self, files: DeclaredFiles) -> bool:
        return files.sentence_transformers_type == "SparseEncoder" or any(
            module.endswith("SpladePooling") for module in files.module_types
        )

    def query_vector(self, output: np.ndarray) -> np.ndarray:
        return output.astype(np.float64)  # a query's weights as they are

    def document_scores(
        self, query_vector: np.ndarray, outputs: Sequence[np.ndarray], windows: list[int]
    ) -> np.ndarray:
        dots = [(vectors.astype(np.float64) @ query_vector).max() for vectors in outputs]
        return np.array(dots, dtype=np.float64)


def sparse_entries(vector: np.ndarray, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero entries of a sparse model's ``vector`` (the ``top_k`` largest, when given),
    as (indices, values) by ascending index: what TEI, Qdrant and Elasticsearch take."""
    indices = np.flatnonzero(vector)
    if top_k is not None and top_k < len(indices):
        largest = np.argpartition(-vector[indices], top_k - 1)[:top_k]
        indices = np.sort(indices[largest])
    return indices, vector[indices]
