"""Tokenization and padding shared by every backend: our own copy of the model's fast tokenizer.

Truncation at the model window and no padding (the controller forms batches; each
item is tokenized once), then a numpy collation each runtime converts as it needs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from functools import partial
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from reranker.backends.base import Backend, Encoded, TokenSpan, Windows
from reranker.backends.templates import CausalRerankTemplate
from reranker.backends.threads import tokenizer_threads
from reranker.errors import StartupError


class TextTokenizer:
    """``token_types`` False (a model with one token type, XLM-R or a decoder): every type id is 0,
    whatever the tokenizer's pair template or overflow windows say. ``padding_side`` as the
    tokenizer declares ("left" for decoders read at the last position). ``template``: a causal-LM
    reranker's prompt, around which pairs are tokenized (templates.py)."""

    def __init__(
        self,
        hf_tokenizer: object,
        max_length: int,
        token_types: bool = True,
        padding_side: str = "right",
        template: CausalRerankTemplate | None = None,
    ) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise StartupError("the model's tokenizer has no fast (Rust) implementation")
        self._setup(Tokenizer.from_str(backend.to_str()), max_length, token_types, padding_side, template)
        self.pad_id = int(getattr(hf_tokenizer, "pad_token_id", None) or 0)

    @classmethod
    def from_file(
        cls,
        tokenizer_json: Path,
        max_length: int,
        pad_id: int,
        token_types: bool = True,
        padding_side: str = "right",
        template: CausalRerankTemplate | None = None,
    ) -> TextTokenizer:
        """From the model's own tokenizer.json, without transformers (the MLX backend's way)."""
        if not tokenizer_json.is_file():
            raise StartupError(f"{tokenizer_json} is missing: the model has no fast tokenizer file")
        tokenizer = cls.__new__(cls)
        tokenizer._setup(
            Tokenizer.from_file(str(tokenizer_json)), max_length, token_types, padding_side, template
        )
        tokenizer.pad_id = pad_id
        return tokenizer

    def _setup(
        self,
        tokenizer: Tokenizer,
        max_length: int,
        token_types: bool,
        padding_side: str,
        template: CausalRerankTemplate | None,
    ) -> None:
        self.token_types = token_types
        self.left_padding = padding_side == "left"
        self.template = template
        self._template_ids: tuple[list[int], list[int]] | None = None  # (prefix, suffix) ids
        self.max_length = max_length
        # A batch's width rounded up to a multiple of this (never past max_length): fewer distinct
        # shapes for kernels compiled per shape (the torch backend sets it for half precision).
        self.pad_multiple = 1
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
        self._windowing: dict[tuple[str, int, int], Tokenizer] = {}  # (pair|text, overlap, length)
        self._unbounded = Tokenizer.from_str(tokenizer.to_str())
        self._unbounded.no_truncation()
        # Whether one text's encoding carries type ids other than 0 (no post-processor here does:
        # its ids are then zeros, not converted from the tokenizer's list per text).
        self._text_types = token_types and any(tokenizer.encode("a probe text").type_ids)

    def _windower(self, kind: str, overlap: int, window: int | None = None) -> Tokenizer:
        """A copy of the tokenizer that cuts what overflows the window into overlapping windows."""
        length = min(window or self.max_length, self.max_length)
        key = (kind, overlap, length)
        if key not in self._windowing:
            windower = Tokenizer.from_str(self._tokenizer.to_str())
            windower.no_padding()
            strategy = "only_second" if kind == "pair" else "longest_first"
            stride = min(overlap, max(length // 2 - 1, 0))  # tokenizers needs stride < window content
            windower.enable_truncation(max_length=length, stride=stride, strategy=strategy)
            self._windowing[key] = windower
        return self._windowing[key]

    def pair_windows(self, pairs: Sequence[tuple[str, str]], overlap: int, max_windows: int) -> list[Windows]:
        """Each (query, document) as windows of query + a slice of the document (``overlap`` tokens
        shared by neighbours), at most ``max_windows``; a query too long to leave room for the
        document falls back to plain truncation."""
        if self.template is not None:
            return [self._templated(query, doc, overlap, max_windows) for query, doc in pairs]
        windower = self._windower("pair", overlap)
        result = []
        for pair in pairs:
            try:
                encoding = windower.encode(*pair)
            except BaseException as error:  # the query fills the window (tokenizers' error or panic)
                if not _is_tokenizer_error(error):
                    raise
                encoded = _to_encoded(self._tokenizer.encode(*pair), self.token_types)
                result.append(Windows([encoded], truncated=True))
                continue
            result.append(_windows(encoding, max_windows, self.token_types))
        return result

    def text_windows(
        self,
        texts: Sequence[str],
        overlap: int,
        max_windows: int,
        window: int | None = None,
        prefix: str = "",
    ) -> list[Windows]:
        """Each text as overlapping windows of ``window`` tokens (default: the model's length),
        at most ``max_windows``. ``prefix`` (a document prompt) begins every window, after the
        leading special tokens: for a text that fits one window the ids equal those of
        ``prefix + text`` (a prompt ends at a word boundary)."""
        if not prefix:
            windower = self._windower("text", overlap, window)
            encodings = _encode_all(windower, list(texts))
            return [_windows(encoding, max_windows, self._text_types) for encoding in encodings]
        prefix_ids = list(self._unbounded.encode(prefix, add_special_tokens=False).ids)
        length = min(window or self.max_length, self.max_length)
        windower = self._windower("text", overlap, max(length - len(prefix_ids), 8))
        result = []
        for encoding in _encode_all(windower, list(texts)):
            every = [encoding, *encoding.overflowing]
            items = [_prefixed(e, prefix_ids) for e in every[:max_windows]]
            result.append(Windows(items, truncated=len(every) > max_windows))
        return result

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """``text`` cut after its first ``max_tokens`` tokens (at a token boundary)."""
        offsets = self._unbounded.encode(text, add_special_tokens=False).offsets
        return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]

    def spans(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[TokenSpan]]:
        """Every token of each text (no truncation), with its character offsets."""
        encodings = _encode_all(
            self._unbounded, list(texts), offsets=True, add_special_tokens=add_special_tokens
        )
        return [
            [
                TokenSpan(token_id, token, start, stop, bool(special))
                for token_id, token, (start, stop), special in zip(
                    e.ids, e.tokens, e.offsets, e.special_tokens_mask, strict=True
                )
            ]
            for e in encodings
        ]

    def texts(self, texts: Sequence[str]) -> list[Encoded]:
        return [_to_encoded(e, self._text_types) for e in _encode_all(self._tokenizer, list(texts))]

    def pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        if self.template is not None:
            return [self._templated(query, doc, 0, 1).items[0] for query, doc in pairs]
        encodings = _encode_all(self._tokenizer, [tuple(p) for p in pairs])
        return [_to_encoded(e, self.token_types) for e in encodings]

    def _templated(self, query_part: str, document: str, overlap: int, max_windows: int) -> Windows:
        """A causal-LM reranker's input: prefix + query part + a window of the document + suffix,
        each tokenized apart (they meet at pre-tokenizer boundaries, so for a document that fits
        the ids equal the whole text's); the suffix ends every window, as the model reads it."""
        template = self.template
        assert template is not None
        if self._template_ids is None:  # the fixed parts, tokenized once
            self._template_ids = tuple(
                list(self._unbounded.encode(text, add_special_tokens=False).ids)
                for text in (template.prefix, template.suffix)
            )
        prefix, suffix = self._template_ids
        query, doc = (
            list(self._unbounded.encode(text, add_special_tokens=False).ids)
            for text in (query_part, template.document_part(document))
        )
        head = (prefix + query)[: max(self.max_length - len(suffix) - 1, 1)]
        room = max(self.max_length - len(head) - len(suffix), 1)
        step = max(room - min(overlap, room - 1), 1)
        starts = list(range(0, max(len(doc) - room, 0) + step, step)) if len(doc) > room else [0]
        kept = [head + doc[start : start + room] + suffix for start in starts[:max_windows]]
        truncated = len(starts) > max_windows or len(head) < len(prefix) + len(query)
        cut = len(doc) > room
        arrays = [np.array(ids, dtype=np.int64) for ids in kept]
        items = [Encoded(ids, np.zeros(len(ids), dtype=np.int64), cut) for ids in arrays]
        return Windows(items, truncated=truncated or (max_windows == 1 and len(doc) > room))

    def collate(self, batch: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """input_ids, token_type_ids, attention_mask: int64 [items, longest item rounded up to
        ``pad_multiple``], padded on the tokenizer's side; type ids all 0 for a model with one token
        type. The rows are filled at once (one concatenation of the items' id arrays, one masked
        assignment), not item by item."""
        lengths = np.fromiter((len(item) for item in batch), dtype=np.int64, count=len(batch))
        width = int(lengths.max())
        if self.pad_multiple > 1:
            width = max(width, min(-(-width // self.pad_multiple) * self.pad_multiple, self.max_length))
        columns = np.arange(width)
        if self.left_padding:
            mask = columns[None, :] >= (width - lengths)[:, None]
        else:
            mask = columns[None, :] < lengths[:, None]
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        ids[mask] = np.concatenate([np.asarray(item.ids, dtype=np.int64) for item in batch])
        type_ids = np.zeros((len(batch), width), dtype=np.int64)
        if self.token_types:
            type_ids[mask] = np.concatenate([np.asarray(item.type_ids, dtype=np.int64) for item in batch])
        return {"input_ids": ids, "token_type_ids": type_ids, "attention_mask": mask.astype(np.int64)}


SMALL_REQUEST = 16  # inputs up to this many are one call on the calling thread (unless spread)
SPREAD_MIN_INPUTS = 4  # fewer are not worth a hand-off to another thread
# Set (contextvars) by a caller with idle cores to use: a small input is spread over them too.
spread_small_inputs: ContextVar[bool] = ContextVar("spread_small_inputs", default=False)
# By thread count. Large inputs' chunks queue on one set of threads; small inputs spread by the
# event loop (which waits for them) have their own, so they never queue behind a large input.
_chunk_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}


def _pool(kind: str, threads: int) -> ThreadPoolExecutor:
    pool = _chunk_pools.get((kind, threads))
    if pool is None:
        made = ThreadPoolExecutor(threads, thread_name_prefix=f"tokenize-{kind}")
        pool = _chunk_pools.setdefault((kind, threads), made)
    return pool


class _CpusEncoding:
    """The CPUs ``_encode_all`` calls are encoding on now, over every thread: a call is granted
    the CPUs it wants that no other call holds (at least one, its own), so an input is spread only
    over idle CPUs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy = 0

    def reserve(self, wanted: int) -> int:
        with self._lock:
            granted = max(1, min(wanted, tokenizer_threads() - self.busy))
            self.busy += granted
            return granted

    def release(self, granted: int) -> None:
        with self._lock:
            self.busy -= granted


_cpus_encoding = _CpusEncoding()


def _encode_all(tokenizer: Tokenizer, inputs: list, offsets: bool = False, **options: bool) -> list:  # type: ignore[type-arg]
    """Encodings of ``inputs`` (texts, or (query, document) tuples); character offsets only when
    asked (``encode_batch``; else ``encode_batch_fast``). The tokenizers' own Rayon pool is off
    (threads.py): shared by every caller, it made a one-text request queue behind a 500-document
    request being encoded beside it. A small input is one call on the calling thread. A large
    one (or a small one under ``spread_small_inputs``) is cut into a chunk per idle CPU (one no
    other call holds, counted when the call starts): the first encoded on the calling thread,
    the others on this module's threads at the same time (the tokenizer releases the GIL while
    it works). Under load every CPU is busy encoding some request, and a request is one call:
    encodings side by side slow each other down (memory-bound), so chunks there cost CPU and
    win nothing. (The direct ``encode`` calls of pair windows and templates are not counted.)"""
    encode = partial(tokenizer.encode_batch if offsets else tokenizer.encode_batch_fast, **options)
    small = len(inputs) <= SMALL_REQUEST
    spread = not small or (spread_small_inputs.get() and len(inputs) >= SPREAD_MIN_INPUTS)
    workers = _cpus_encoding.reserve(tokenizer_threads() if spread else 1)
    try:
        if workers <= 1:
            return encode(inputs)
        pool = _pool("small" if small else "large", tokenizer_threads() - 1)
        step = -(-len(inputs) // workers)
        chunks = [inputs[start : start + step] for start in range(0, len(inputs), step)]
        others = [pool.submit(encode, chunk) for chunk in chunks[1:]]
        encodings = encode(chunks[0])
        for chunk, part in zip(chunks[1:], others, strict=True):
            # A chunk no thread has started yet (the CPUs are busy elsewhere) is encoded here:
            # the caller, the event loop among them, never waits for a thread to be scheduled.
            encodings.extend(encode(chunk) if part.cancel() else part.result())
        return encodings
    finally:
        _cpus_encoding.release(workers)


def _is_tokenizer_error(error: BaseException) -> bool:
    """An error of the tokenizers library: an Exception, or a Rust panic (pyo3's PanicException
    derives from BaseException), e.g. a stride longer than the room a long query leaves."""
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def _windows(encoding: object, max_windows: int, token_types: bool = True) -> Windows:
    every = [encoding, *encoding.overflowing]  # type: ignore[attr-defined]
    kept = [_to_encoded(e, token_types, truncated=False) for e in every[:max_windows]]
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

    def text_windows(
        self,
        texts: Sequence[str],
        overlap: int,
        max_windows: int,
        window: int | None = None,
        prefix: str = "",
    ) -> list[Windows]:
        return self.tokenizer.text_windows(texts, overlap, max_windows, window, prefix)

    def truncate_text(self, text: str, max_tokens: int) -> str:
        return self.tokenizer.truncate_text(text, max_tokens)

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[TokenSpan]]:
        return self.tokenizer.spans(texts, add_special_tokens)


def _prefixed(encoding: object, prefix_ids: list[int]) -> Encoded:
    """``encoding``'s ids with ``prefix_ids`` after its leading special tokens (type 0)."""
    ids = list(encoding.ids)  # type: ignore[attr-defined]
    special = encoding.special_tokens_mask  # type: ignore[attr-defined]
    lead = 0
    while lead < len(ids) - 1 and special[lead]:
        lead += 1
    joined = np.array(ids[:lead] + prefix_ids + ids[lead:], dtype=np.int64)
    return Encoded(joined, np.zeros(len(joined), dtype=np.int64))


def _to_encoded(encoding: object, token_types: bool = True, truncated: bool | None = None) -> Encoded:
    """The encoding's ids (and type ids) as int64 arrays, converted once here; they stay arrays
    until the batch is collated. ``truncated`` None: whether the tokenizer cut anything off."""
    ids = np.array(encoding.ids, dtype=np.int64)  # type: ignore[attr-defined]
    if token_types:
        type_ids = np.array(encoding.type_ids, dtype=np.int64)  # type: ignore[attr-defined]
    else:
        type_ids = np.zeros(len(ids), dtype=np.int64)
    if truncated is None:
        truncated = bool(encoding.overflowing)  # type: ignore[attr-defined]
    return Encoded(ids=ids, type_ids=type_ids, truncated=truncated)
