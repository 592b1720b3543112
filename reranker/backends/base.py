"""The small contract every backend fulfils, and the types that cross it.

A backend tokenizes (once, on the caller's thread) and runs batches of already
tokenized items, returning numpy. It knows nothing of HTTP, queues or requests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from reranker.errors import UnsupportedOperationError
from reranker.kinds import Kind, ModelKind, kind_of


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a backend serves; reported by /health."""

    name: str
    kind: ModelKind
    backend: str
    device: str
    max_length: int
    dimension: int | None = None
    normalize_embeddings: bool = True
    dtype: str = "float32"
    details: dict[str, str] = field(default_factory=dict)
    family: str = ""  # config.json model_type
    activation: str = "sigmoid"  # cross-encoders: the declared activation of the logit
    prompts: dict[str, str] = field(default_factory=dict)  # bi-encoders: name -> text prepended
    default_prompt_name: str | None = None
    instruction: str | None = None  # instruction-style rerankers (Qwen3-Reranker): the default
    labels: tuple[str, ...] = ()  # classifiers: id2label in label-index order
    multi_label: bool = False  # classifiers: problem_type multi_label_classification (sigmoid per label)

    @property
    def strategy(self) -> Kind:
        """What the kind does (reranker/kinds/): the one object every layer asks."""
        return kind_of(self.kind)

    @property
    def capabilities(self) -> list[str]:
        return list(self.strategy.capabilities)


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized model input: a text (bi-encoder) or a query/document pair.

    ``ids`` and ``type_ids``: int64 NumPy arrays from every real tokenizer (converted once from
    the tokenizer's output, then never per token in Python); any int sequence is accepted."""

    ids: np.ndarray | Sequence[int]
    type_ids: np.ndarray | Sequence[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Windows:
    """A document's model inputs: one, or several overlapping windows of a long document."""

    items: list[Encoded]
    truncated: bool  # part of the document is in no window (over max_windows, or cut plainly)


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """One token of a text as the model's tokenizer cuts it (what TEI's /tokenize shows)."""

    id: int
    token: str  # the tokenizer's own string for it ("##ing", "[CLS]")
    start: int  # offsets of its characters in the text; (0, 0) for a special token
    stop: int
    special: bool


class TokenVectors:
    """A backend seen as its transformer's last hidden states: ``forward`` answers an object
    array, one ``[tokens, hidden]`` float32 array per item (padding left out). What a second
    controller of the model batches for /embed_all."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        return self.backend.token_vectors(batch)

    def info(self) -> ModelInfo:
        return self.backend.info()


class Backend(ABC):
    """Score pairs or embed texts. ``forward`` is called from worker threads."""

    selection: str = "given to create_app"  # why this backend serves: set by the factory
    query_weights: np.ndarray | None = None  # inference-free sparse models: a query's weight per token id
    preferred_batch_size: int | None = None  # the default batch on this device when BATCH_SIZE is unset

    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    def tokenize_texts(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenize single texts (bi-encoder input), truncating at max_length."""

    @abstractmethod
    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        """Tokenize (query, document) pairs (cross-encoder input), truncating at max_length."""

    @abstractmethod
    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        """Run one batch.

        Cross-encoder: raw logits, shape ``[n]`` (no activation: post-processing is ours).
        Classifier: raw logits, shape ``[n, labels]``.
        Bi-encoder: pooled embeddings before any normalisation, shape ``[n, dim]``.
        Sparse: the pooled vocabulary-sized weights, shape ``[n, vocabulary]``.
        """

    serves_token_vectors = False  # True: ``token_vectors`` answers (/embed_all)
    runs_batches_concurrently = True  # False: one ``forward`` at a time (MAX_PARALLEL_REQUESTS ignored)

    def token_vectors(self, batch: Sequence[Encoded]) -> np.ndarray:
        """Per item, the transformer's last hidden state of each of its tokens (before pooling)."""
        raise UnsupportedOperationError(
            f"{type(self).__name__} does not answer token vectors: BACKEND=torch does"
        )

    # Long documents. Backends with a real tokenizer cut overflowing text into overlapping
    # windows; this default (the fake backend's) makes one window, plainly truncated.
    def pair_windows(self, pairs: Sequence[tuple[str, str]], overlap: int, max_windows: int) -> list[Windows]:
        return [Windows([item], item.truncated) for item in self.tokenize_pairs(pairs)]

    def text_windows(
        self,
        texts: Sequence[str],
        overlap: int,
        max_windows: int,
        window: int | None = None,
        prefix: str = "",
    ) -> list[Windows]:
        """``window``: tokens per window (default and most: the model's max length); ``prefix``
        (a document prompt) begins every window."""
        return [Windows([item], item.truncated) for item in self.tokenize_texts([prefix + t for t in texts])]

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """``text`` cut after its first ``max_tokens`` tokens."""
        return text

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[TokenSpan]]:
        """Every token of each text, untruncated, with its offsets (the tokenizer the model loaded)."""
        raise UnsupportedOperationError(f"the model {self.info().name} has no tokenizer to show")

    def health(self) -> None:
        """Raise if the backend cannot serve; default: a tiny real forward pass."""
        result = self.forward(self.info().strategy.probe_inputs(self, ["health", "check"]))
        if not np.all(np.isfinite(result)):
            raise RuntimeError("health probe produced non-finite output")

    def warmup(self) -> None:
        """One forward pass before the server reports ready."""
        self.health()

    # Conveniences for in-process use and tests; the server goes through the controller.
    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> np.ndarray:
        encoded = self.tokenize_pairs(pairs)
        parts = [self.forward(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float32)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        encoded = self.tokenize_texts(texts)
        parts = [self.forward(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]
        dim = self.info().dimension or 0
        return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
