"""Tokenization and padding shared by every backend: our own copy of the model's fast tokenizer.

Truncation at the model window and no padding (the controller forms batches; each
item is tokenized once), then a numpy collation each runtime converts as it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from reranker.backends.base import Backend, Encoded, Windows
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
        self.max_length = max_length
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
        self._windowing: dict[tuple[str, int], Tokenizer] = {}  # (pair|text, overlap) -> tokenizer
        self._unbounded = Tokenizer.from_str(tokenizer.to_str())
        self._unbounded.no_truncation()

    def _windower(self, kind: str, overlap: int) -> Tokenizer:
        """A copy of the tokenizer that cuts what overflows the window into overlapping windows."""
        key = (kind, overlap)
        if key not in self._windowing:
            windower = Tokenizer.from_str(self._tokenizer.to_str())
            windower.no_padding()
            strategy = "only_second" if kind == "pair" else "longest_first"
            windower.enable_truncation(max_length=self.max_length, stride=overlap, strategy=strategy)
            self._windowing[key] = windower
        return self._windowing[key]

    def pair_windows(self, pairs: Sequence[tuple[str, str]], overlap: int, max_windows: int) -> list[Windows]:
        """Each (query, document) as windows of query + a slice of the document (``overlap`` tokens
        shared by neighbours), at most ``max_windows``; a query too long to leave room for the
        document falls back to plain truncation."""
        windower = self._windower("pair", overlap)
        result = []
        for pair in pairs:
            try:
                encoding = windower.encode(*pair)
            except Exception:  # noqa: BLE001 - tokenizers' truncation error: the query fills the window
                result.append(Windows([_to_encoded(self._tokenizer.encode(*pair))], truncated=True))
                continue
            result.append(_windows(encoding, max_windows))
        return result

    def text_windows(self, texts: Sequence[str], overlap: int, max_windows: int) -> list[Windows]:
        """Each text as overlapping windows of the model's length, at most ``max_windows``."""
        windower = self._windower("text", overlap)
        return [_windows(encoding, max_windows) for encoding in _encode_all(windower, list(texts))]

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """``text`` cut after its first ``max_tokens`` tokens (at a token boundary)."""
        offsets = self._unbounded.encode(text, add_special_tokens=False).offsets
        return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]

    def texts(self, texts: Sequence[str]) -> list[Encoded]:
        return [_to_encoded(e) for e in _encode_all(self._tokenizer, list(texts))]

    def pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        return [_to_encoded(e) for e in _encode_all(self._tokenizer, [tuple(p) for p in pairs])]

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


SMALL_REQUEST = 16  # inputs up to this many are encoded one by one, outside the Rayon pool


def _encode_all(tokenizer: Tokenizer, inputs: list) -> list:  # type: ignore[type-arg]
    """Encodings of ``inputs``. ``encode_batch`` runs on the tokenizers' one shared Rayon pool,
    where a one-text request queues behind the whole of a 500-document request being encoded
    beside it (16 s measured next to four 10 MB requests); a small input is encoded on the
    calling thread instead, which the pool's work cannot hold up."""
    if len(inputs) <= SMALL_REQUEST:
        return [
            tokenizer.encode(*item) if isinstance(item, tuple) else tokenizer.encode(item) for item in inputs
        ]
    return tokenizer.encode_batch(inputs)


def _windows(encoding: object, max_windows: int) -> Windows:
    every = [encoding, *encoding.overflowing]  # type: ignore[attr-defined]
    kept = [Encoded(e.ids, e.type_ids) for e in every[:max_windows]]
    return Windows(kept, truncated=len(every) > max_windows)


class TokenizedBackend(Backend):
    """A backend whose tokenization is a ``TextTokenizer`` (all of ours): the two methods, once."""

    tokenizer: TextTokenizer

    def tokenize_texts(self, texts: Sequence[str]) -> list[Encoded]:
        return self.tokenizer.texts(texts)

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        return self.tokenizer.pairs(pairs)

    def pair_windows(self, pairs: Sequence[tuple[str, str]], overlap: int, max_windows: int) -> list[Windows]:
        return self.tokenizer.pair_windows(pairs, overlap, max_windows)

    def text_windows(self, texts: Sequence[str], overlap: int, max_windows: int) -> list[Windows]:
        return self.tokenizer.text_windows(texts, overlap, max_windows)

    def truncate_text(self, text: str, max_tokens: int) -> str:
        return self.tokenizer.truncate_text(text, max_tokens)


def _to_encoded(encoding: object) -> Encoded:
    return Encoded(
        ids=encoding.ids,  # type: ignore[attr-defined]
        type_ids=encoding.type_ids,  # type: ignore[attr-defined]
        truncated=bool(encoding.overflowing),  # type: ignore[attr-defined]
    )
