"""What a model kind is: the one object, chosen when a model loads, that every layer asks
instead of branching on the kind's name.

A kind says what its inputs are (texts, pairs or either), what a forward pass answers per
input (one score, label logits, a dense vector, vocabulary weights), which routes it serves
(its capabilities), how the model's files declare it, how each backend's raw output becomes
its answer, and how a rerank scores documents with it. It imports numpy only: backends,
the engine and the HTTP layer all read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal

import numpy as np


class ModelKind(StrEnum):
    CROSS_ENCODER = "cross-encoder"  # a reranker: one logit per (query, document) pair
    BI_ENCODER = "bi-encoder"  # one dense vector per text
    CLASSIFIER = "classifier"  # one logit per label per text or pair (id2label)
    SPARSE = "sparse"  # one vocabulary-sized vector per text, mostly zeros (SPLADE)


Inputs = Literal["texts", "pairs", "either"]
Output = Literal["score", "labels", "vector", "weights"]
RerankBy = Literal["pairs", "vectors", "none"]


@dataclass(frozen=True, slots=True)
class DeclaredFiles:
    """What a model directory says of itself (config_sentence_transformers.json ``model_type``,
    the types of its modules.json modules, config.json ``architectures``)."""

    sentence_transformers_type: str | None
    module_types: tuple[str, ...]
    architectures: tuple[str, ...]


class Kind:
    """A model kind's behaviour. Subclasses set the class attributes and override what differs."""

    name: ClassVar[ModelKind]
    capabilities: ClassVar[tuple[str, ...]]  # the route capabilities it serves ("rerank", "embed", ...)
    inputs: ClassVar[Inputs]
    output: ClassVar[Output]  # what forward answers per input
    does: ClassVar[str]  # for refusals: "the model X is a <name>: it <does>"
    sentence_transformers_class: ClassVar[str]  # what the torch backend loads it with
    rerank_by: ClassVar[RerankBy] = "none"  # pairs through the model, or vectors compared
    on_mlx: ClassVar[bool] = False  # whether the MLX backend runs it
    prompts: ClassVar[bool] = False  # whether the model's prompts (query/document) apply
    labels: ClassVar[bool] = False  # whether it reports id2label
    token_vectors: ClassVar[bool] = False  # whether /embed_all may serve its hidden states
    normalizes: ClassVar[bool] = False  # whether its vectors follow the model's Normalize module

    def declared(self, files: DeclaredFiles) -> bool:
        """Whether the model's sentence-transformers files say it is this kind."""
        return False

    def inferred(self, files: DeclaredFiles) -> bool:
        """Whether a model with no sentence-transformers declaration is this kind by its architecture."""
        return False

    @property
    def takes_texts(self) -> bool:
        return self.inputs != "pairs"

    @property
    def one_score(self) -> bool:
        """Whether forward answers one number per input (compared as scores, not as directions)."""
        return self.output == "score"

    def serves(self, capability: str) -> bool:
        return capability in self.capabilities

    def probe_inputs(self, backend: Any, texts: Sequence[str]) -> list[Any]:
        """``texts`` tokenized as this kind's inputs: paired with the first for a pair kind."""
        if self.inputs == "pairs":
            return backend.tokenize_pairs([(texts[0], text) for text in texts])
        return backend.tokenize_texts(list(texts))

    # How each backend's raw output becomes this kind's answer per input.
    def torch_output(self, features: dict[str, Any]) -> Any:
        """From the sentence-transformers modules' features: [n] scores, [n, labels], [n, dim]."""
        return features["sentence_embedding"]

    def onnx_output(self, output: np.ndarray, items: int) -> np.ndarray:
        return output

    onnx_output_names: ClassVar[tuple[str, ...]] = ("output", "sentence_embedding")

    # A rerank with a vector kind (rerank_by "vectors").
    def query_vector(self, output: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"a {self.name.value} does not compare vectors")

    def document_scores(
        self, query_vector: np.ndarray, outputs: Sequence[np.ndarray], windows: list[int]
    ) -> np.ndarray:
        raise NotImplementedError(f"a {self.name.value} does not compare vectors")

    @property
    def embeds(self) -> bool:
        """Whether it answers a vector per text (/embed, /v1/embeddings, /embed_sparse)."""
        return self.output in ("vector", "weights")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
