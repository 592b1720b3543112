"""Tokenization and padding shared by every backend: our own copy of the model's fast tokenizer.

Truncation at the model window and no padding (the controller forms batches; each
item is tokenized once), then a numpy collation each runtime converts as it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from reranker.backends.base import Backend, Encoded
from reranker.errors import StartupError


class TextTokenizer:
    def __init__(self, hf_tokenizer: object, max_length: int) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise StartupError("the model's tokenizer has no fast (Rust) implementation")
        self._setup(Tokenizer.from_str(backend.to_str()), max_length)
        self.pad_id = int(getattr(hf_tokenizer, "pad_token_id", None) or 0)

    @classmethod
    def from_file(cls, tokenizer_json: Path, max_length: int, pad_id: int) -> TextTokenizer:
        """From the model's own tokenizer.json, without transformers (the MLX backend's way)."""
        if not tokenizer_json.is_file():
            raise StartupError(f"{tokenizer_json} is missing: the model has no fast tokenizer file")
        tokenizer = cls.__new__(cls)
        tokenizer._setup(Tokenizer.from_file(str(tokenizer_json)), max_length)
        tokenizer.pad_id = pad_id
        return tokenizer

    def _setup(self, tokenizer: Tokenizer, max_length: int) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")

    def texts(self, texts: Sequence[str]) -> list[Encoded]:
        return [_to_encoded(e) for e in self._tokenizer.encode_batch(list(texts))]

    def pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        return [_to_encoded(e) for e in self._tokenizer.encode_batch([tuple(p) for p in pairs])]

    def collate(self, batch: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """input_ids, token_type_ids, attention_mask: int64 [items, longest item], right-padded."""
        width = max(len(item) for item in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        type_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, item in enumerate(batch):
            n = len(item)
            ids[row, :n] = item.ids
            type_ids[row, :n] = item.type_ids
            mask[row, :n] = 1
        return {"input_ids": ids, "token_type_ids": type_ids, "attention_mask": mask}


class TokenizedBackend(Backend):
    """A backend whose tokenization is a ``TextTokenizer`` (all of ours): the two methods, once."""

    tokenizer: TextTokenizer

    def tokenize_texts(self, texts: Sequence[str]) -> list[Encoded]:
        return self.tokenizer.texts(texts)

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        return self.tokenizer.pairs(pairs)


def _to_encoded(encoding: object) -> Encoded:
    return Encoded(
        ids=encoding.ids,  # type: ignore[attr-defined]
        type_ids=encoding.type_ids,  # type: ignore[attr-defined]
        truncated=bool(encoding.overflowing),  # type: ignore[attr-defined]
    )
