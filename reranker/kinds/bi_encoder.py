"""Bi-encoders: one dense vector per text (sentence-transformers ``SentenceTransformer``).

A rerank embeds the query and each document and ranks by cosine, a long document by its best
window's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reranker.kinds.base import DeclaredFiles, Kind, ModelKind, l2_normalize


class BiEncoder(Kind):
    name = ModelKind.BI_ENCODER
    capabilities = ("rerank", "embed")
    inputs = "texts"
    output = "vector"
    does = "embeds texts"
    sentence_transformers_class = "SentenceTransformer"
    rerank_by = "vectors"
    on_mlx = True
    prompts = True
    token_vectors = True
    normalizes = True

    def declared(self, files: DeclaredFiles) -> bool:
        # A pooled model without a declaration too: e.g. Qwen3-Embedding, a *ForCausalLM config.
        return files.sentence_transformers_type == "SentenceTransformer" or any(
            module.endswith("Pooling") for module in files.module_types
        )

    def query_vector(self, output: np.ndarray) -> np.ndarray:
        return l2_normalize(output)

    def document_scores(
        self, query_vector: np.ndarray, outputs: Sequence[np.ndarray], windows: list[int]
    ) -> np.ndarray:
        return best_cosines(outputs, windows, query_vector)


def best_cosines(outputs: Sequence[np.ndarray], windows: list[int], query_vector: np.ndarray) -> np.ndarray:
    """Each document's best cosine with the (normalised) query over its windows, float64: every
    window at once, each row's dot product summed the same way whatever else is in the request
    (einsum's own loop, not BLAS's, whose kernels differ with the number of rows)."""
    if not outputs:
        return np.zeros((0,), dtype=np.float64)
    vectors = l2_normalize(np.concatenate(outputs) if len(outputs) > 1 else outputs[0])
    cosines = np.einsum("ij,j->i", vectors, query_vector)
    starts = np.cumsum([0, *windows[:-1]])
    return np.maximum.reduceat(cosines, starts).astype(np.float64)
