"""What a request means for the model: tokenize, run through the controller, post-process.

Rerank on a cross-encoder scores (query, document) pairs and applies the activation
the model declares (sigmoid unless it says identity, softmax or tanh) to the single
logit; an instruction-style causal LM reranker gets its query part from its template.
Rerank on a bi-encoder embeds the query and the documents (with the model's query and
document prompts) and returns cosine similarities. A document longer than the model window
is scored as the best of its overlapping windows when the request asks for chunking.
With a prediction cache, items already computed are answered from it and only the rest
are tokenized and queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from reranker.backends.base import Backend, TokenSpan, Windows
from reranker.backends.templates import CAUSAL_TEMPLATES
from reranker.backends.threads import tokenizer_threads
from reranker.backends.tokenization import spread_small_inputs
from reranker.engine.cache import CachedOutput, PredictionCache
from reranker.engine.controller import InferenceController
from reranker.engine.prompts import document_prompt, embed_prompt, query_prompt
from reranker.errors import InvalidInputError, NotReadyError, StartupError, UnsupportedOperationError
from reranker.kinds.base import l2_normalize
from reranker.kinds.classifier import label_scores
from reranker.kinds.cross_encoder import activate
from reranker.tracing import current_trace

log = logging.getLogger(__name__)


BACKGROUND_TIMEOUT_S = 3600.0  # a job's slice may wait while interactive requests go first
# A request this small, arriving while no other is being computed, is tokenized on the event loop:
# well under a millisecond of a fast tokenizer on one core (one call that no other request's work
# can hold up: tokenization.py), less than a hand-off to a thread and back adds to its latency.
# Under concurrent load it goes to a thread like a big one: the tokenizer releases the GIL while it
# works, so the loop serves other requests meanwhile (the loop, not the tokenizer, is then the limit).
INLINE_TOKENIZE_ITEMS = 16
INLINE_TOKENIZE_CHARS = 8192


def _chars(keys: list[tuple[str, ...]], positions: list[int]) -> int:
    """Characters the tokenizer reads for ``positions`` (every text part of their keys)."""
    return sum(len(part) for i in positions for part in keys[i][1:])


class TextTooLongError(InvalidInputError):
    """A text exceeds the model window and the request forbade truncation."""

    def __init__(self, position: int, max_tokens: int) -> None:
        super().__init__(
            f"text {position} is longer than the model's {max_tokens} tokens and truncate is false"
        )
        self.position = position
        self.max_tokens = max_tokens


@dataclass(frozen=True, slots=True)
class Timing:
    queue_ms: float
    inference_ms: float
    batch_size: int  # largest batch the request's items rode in; 0 when all came from the cache
    cache_hits: int = 0
    batches: int = 0  # model batches the request's items rode in


@dataclass(frozen=True, slots=True)
class LongDocuments:
    """What rerank does with a document longer than the model window.

    ``chunk``: score overlapping windows of it (``overlap`` tokens shared by neighbours, at
    most ``max_windows``) and keep the best; ``truncate``: score its beginning; ``refuse``:
    a 422 naming it.
    """

    mode: str = "truncate"  # chunk | truncate | refuse
    max_windows: int = 1
    overlap: int = 0
    window: int | None = None  # bi-encoder documents: tokens per window (RERANK_WINDOW_TOKENS)

    @property
    def cache_tag(self) -> str:
        return f"w{self.max_windows}o{self.overlap}l{self.window or ''}" if self.mode == "chunk" else ""


TRUNCATE = LongDocuments()


@dataclass(frozen=True, slots=True)
class Computed:
    """Model outputs for every item of a request, from the cache or the model."""

    outputs: list[np.ndarray]  # per item, in request order: [windows] logits or [windows, dim] vectors
    tokens: int
    truncated: list[int]  # positions with text in no window (cut at the window or max_windows)
    timing: Timing
    rows: np.ndarray | None = None  # one window per item: the outputs as one array, [n] or [n, dim]


@dataclass(frozen=True, slots=True)
class RerankOutcome:
    scores: np.ndarray  # one per document, in request order
    ranking: np.ndarray  # what orders them (float64): the raw logit, or the cosine; no ties at 1.0
    tokens: int
    timing: Timing
    windows: list[int]  # windows scored per document
    truncated_documents: list[int]  # positions of documents with text that was not scored

    @property
    def truncated(self) -> int:
        return len(self.truncated_documents)


@dataclass(frozen=True, slots=True)
class EmbedOutcome:
    vectors: np.ndarray  # [n, dim] float32, in request order
    tokens: int
    truncated: int  # texts cut at the model's max length
    timing: Timing


@dataclass(frozen=True, slots=True)
class ClassifyOutcome:
    logits: np.ndarray  # [inputs, labels], raw
    scores: np.ndarray  # [inputs, labels]: softmax over labels, or a sigmoid each (one label, multi-label)
    tokens: int
    truncated: int
    timing: Timing


class InferenceService:
    def __init__(
        self,
        backend: Backend,
        controller: InferenceController,
        timeout_s: float,
        cache: PredictionCache | None = None,
        default_prompt_name: str | None = None,
        token_controller: InferenceController | None = None,
    ) -> None:
        self._backend = backend
        self._controller = controller
        self._token_controller = token_controller  # /embed_all: the model's hidden states per token
        self._timeout_s = timeout_s
        self._cache = cache
        self._computing = 0  # requests between arrival and answer in _compute (the loop's load)
        self._tokenizing_pools: dict[str, ThreadPoolExecutor] = {}  # by thread name prefix
        self._closed = False
        info = backend.info()
        self._info = info  # a backend's facts do not change while it serves: read once
        self.kind = info.kind
        self.strategy = info.strategy  # what the kind does: chosen once, at load
        self._template = CAUSAL_TEMPLATES.get(info.family) if info.instruction is not None else None
        if default_prompt_name is not None and default_prompt_name not in info.prompts:
            declared = ", ".join(sorted(info.prompts)) or "none"
            raise StartupError(
                f"DEFAULT_PROMPT_NAME={default_prompt_name!r}: the model {info.name} declares no such "
                f"prompt (its prompts: {declared})"
            )
        self.default_prompt_name = default_prompt_name

    def _tokenizing(self, pool: str) -> ThreadPoolExecutor:
        """The threads requests are tokenized on off the event loop, one per CPU in each of two
        pools: ``tokenize-req`` for small requests under load, ``tokenize-big`` for large ones
        (apart, so that a small request never waits behind a large one). Many requests arriving
        at once queue here rather than contend for the cores and the GIL: with a thread per
        request, 64 clients of 64 texts each served a quarter fewer requests than 16."""
        if self._closed:
            raise NotReadyError("the server is shutting down")
        if pool not in self._tokenizing_pools:
            threads = tokenizer_threads()
            self._tokenizing_pools[pool] = ThreadPoolExecutor(threads, thread_name_prefix=pool)
        return self._tokenizing_pools[pool]

    def close(self) -> None:
        """Let the tokenizing threads end (any tokenization under way finishes first); a request
        still arriving is refused as the server's other work is while it shuts down."""
        self._closed = True
        for pool in self._tokenizing_pools.values():
            pool.shutdown(wait=False)
        self._tokenizing_pools.clear()

    async def _compute(
        self,
        keys: list[tuple[str, ...]],
        tokenize: Callable[[list[int]], list[Windows]],
        refuse_truncated: Callable[[int], None] | None = None,
        background: bool = False,
        skip_first: bool = False,
    ) -> Computed:
        self._computing += 1
        try:
            return await self._compute_counted(keys, tokenize, refuse_truncated, background, skip_first)
        finally:
            self._computing -= 1

    async def _compute_counted(
        self,
        keys: list[tuple[str, ...]],
        tokenize: Callable[[list[int]], list[Windows]],
        refuse_truncated: Callable[[int], None] | None,
        background: bool,
        skip_first: bool,
    ) -> Computed:
        """Outputs for the items whose cache-key parts are ``keys``: cached ones from the cache,
        the rest tokenized once (``tokenize(positions)``, one or more windows each) and queued
        together, so the windows of many documents share batches.

        ``refuse_truncated(position)`` may raise before any model work when an item is too long.
        ``skip_first``: item 0 is answered by the caller (an empty output, no tokens).
        """
        arrived_at = asyncio.get_running_loop().time()  # waiting counts from here, tokenizing included
        trace = None if background else current_trace.get()  # None: tracing off, or a job's slice
        cache = self._cache
        cache_keys = [cache.key(*parts) for parts in keys] if cache is not None else []
        cached = cache.get_many(cache_keys) if cache is not None else {}
        hits = len(cached)
        if skip_first:
            hits -= int(0 in cached)
            cached[0] = CachedOutput(np.zeros((0,), dtype=np.float32), 0, False)
        missing = [i for i in range(len(keys)) if i not in cached] if cached else list(range(len(keys)))
        if missing and not background:
            self._controller.admit()  # a full queue refuses before any tokenizing (cache hits pass)
        tokenizing = time.perf_counter()
        small = len(missing) <= INLINE_TOKENIZE_ITEMS and _chars(keys, missing) <= INLINE_TOKENIZE_CHARS
        if not missing:
            windows = []
        elif small and self._computing == 1:  # small, and nothing else to serve: no hand-off
            # The other cores help while the model is idle (its threads would hold them otherwise).
            spreading = spread_small_inputs.set(self._controller.in_flight == 0)
            try:
                windows = tokenize(missing)
            finally:
                spread_small_inputs.reset(spreading)
        else:
            pool = self._tokenizing("tokenize-req" if small else "tokenize-big")
            windows = await asyncio.get_running_loop().run_in_executor(pool, tokenize, missing)
        if trace is not None and missing:
            trace.tokenized(tokenizing, len(missing))
        truncated = sorted(
            [i for i, entry in cached.items() if entry.truncated]
            + [i for i, item in zip(missing, windows, strict=True) if item.truncated]
        )
        if truncated and refuse_truncated is not None:
            refuse_truncated(truncated[0])
        entries: dict[int, CachedOutput] = dict(cached)
        timing = Timing(0.0, 0.0, 0, cache_hits=hits)
        if missing:
            flat = [encoded for item in windows for encoded in item.items]
            timeout_s = BACKGROUND_TIMEOUT_S if background else self._timeout_s
            timeout_name = "the job slice timeout" if background else "REQUEST_TIMEOUT_S"
            result = await self._controller.run(
                flat, timeout_s, background, timeout_name, arrived_at, traced=trace is not None
            )
            if trace is not None:
                trace.inferred(result, self._info)
            timing = Timing(result.queue_ms, result.inference_ms, result.batch_size, hits, result.batches)
            if cache is None and not cached and len(flat) == len(windows):
                # One window per item, nothing cached: the batch's rows are the answer as they are.
                return Computed(
                    outputs=list(result.outputs[:, None]),
                    tokens=sum(len(encoded) for encoded in flat),
                    truncated=truncated,
                    timing=timing,
                    rows=result.outputs,
                )
            offset = 0
            for position, item in zip(missing, windows, strict=True):
                count = len(item.items)
                output = result.outputs[offset : offset + count].copy()
                offset += count
                entry = CachedOutput(output, sum(len(e) for e in item.items), item.truncated)
                entries[position] = entry
                if cache is not None:
                    cache.put(cache_keys[position], entry)
        ordered = [entries[i] for i in range(len(keys))]
        return Computed(
            outputs=[entry.output for entry in ordered],
            tokens=sum(entry.tokens for entry in ordered),
            truncated=truncated,
            timing=timing,
        )

    def _windows(
        self, texts: list[str], positions: list[int], long: LongDocuments, prefix: str = ""
    ) -> list[Windows]:
        """Windows of ``texts[positions]``; ``prefix`` (a document prompt) begins each of them."""
        chosen = [texts[i] for i in positions]
        if long.mode == "chunk":
            return self._backend.text_windows(chosen, long.overlap, long.max_windows, long.window, prefix)
        chosen = [prefix + text for text in chosen]
        return [Windows([item], item.truncated) for item in self._backend.tokenize_texts(chosen)]

    def _pair_windows(
        self, pairs: list[tuple[str, str]], positions: list[int], long: LongDocuments
    ) -> list[Windows]:
        chosen = [pairs[i] for i in positions]
        if long.mode == "chunk":
            return self._backend.pair_windows(chosen, long.overlap, long.max_windows)
        return [Windows([item], item.truncated) for item in self._backend.tokenize_pairs(chosen)]

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        long: LongDocuments = TRUNCATE,
        background: bool = False,
        query_vector: np.ndarray | None = None,
        instruction: str | None = None,
    ) -> RerankOutcome:
        """Scores of ``documents`` for ``query``. A document over the model window is, by
        ``long``: the max over its windows' scores (Cohere's semantics), its beginning's score,
        or refused (``TextTooLongError`` naming its position). A bi-encoder may be given the
        query's vector (``query_vector_of``), so a job's slices embed it once; it
        applies the model's query and document prompts (prompts.py). An instruction-style
        reranker (Qwen3-Reranker) takes ``instruction``, else its default."""
        refuse = self._refuse_document if long.mode == "refuse" else None
        info = self._info
        self.check_instruction(instruction)
        strategy = self.strategy
        if strategy.rerank_by == "pairs":
            query = self.scoring_query(query, instruction)
            pairs = [(query, doc) for doc in documents]
            keys = [("pair" + long.cache_tag, query, doc) for doc in documents]
            computed = await self._compute(
                keys, lambda pos: self._pair_windows(pairs, pos, long), refuse, background
            )
            ranking = np.array([logits.max() for logits in computed.outputs], dtype=np.float64)
            scores = activate(ranking, info.activation)
            windows = [len(logits) for logits in computed.outputs]
            cut = computed.truncated
        else:
            prompt = document_prompt(info)
            texts = [query_prompt(info) + query, *documents]
            keys = [("text", texts[0])] + [("text" + long.cache_tag, prompt + doc) for doc in documents]
            if query_vector is None and self.inference_free:  # the query: the static table, no model
                query_vector = (
                    (await self.embed([texts[0]], prompt="", query=True)).vectors[0].astype(np.float64)
                )
            given = query_vector is not None
            if given:  # position 0 (the query) is answered already: nothing to compute for it
                texts[0], keys[0] = "", ("given-query",)

            # The query with the documents in one tokenizer call where the documents' windows
            # begin as the query's plain cut would (no document prompt, the model's whole window):
            # one call less per request (under load each call waits for the interpreter lock again).
            whole_window = long.mode != "chunk" or (long.window or self.max_tokens) >= self.max_tokens
            together = whole_window and not prompt

            def tokenize(positions: list[int]) -> list[Windows]:
                if together and positions[:1] == [0]:
                    query, *rest = self._windows(texts, positions, long)
                    query_cut = query.truncated or len(query.items) > 1  # the query: one window
                    return [Windows(query.items[:1], query_cut), *rest]
                query_part = [p for p in positions if p == 0]  # the query: one window, plainly cut
                head = self._windows(texts, query_part, TRUNCATE)
                return head + self._windows(texts, [p for p in positions if p > 0], long, prompt)

            def refuse_document(position: int) -> None:
                if position > 0 and refuse is not None:
                    refuse(position - 1)

            computed = await self._compute(
                keys, tokenize, refuse_document if refuse else None, background, skip_first=given
            )
            windows = [len(vectors) for vectors in computed.outputs[1:]]
            if query_vector is None:
                query_vector = strategy.query_vector(computed.outputs[0][0])  # (computed above)
            ranking = strategy.document_scores(query_vector, computed.outputs[1:], windows)
            scores = ranking.astype(np.float32)
            cut = [position - 1 for position in computed.truncated if position > 0]  # documents only
        return RerankOutcome(scores, ranking, computed.tokens, computed.timing, windows, cut)

    async def classify(
        self, inputs: Sequence[str | tuple[str, str]], allow_truncation: bool = True, background: bool = False
    ) -> ClassifyOutcome:
        """Label scores of each input, a text or a (text, text) pair, by a classifier. With
        ``allow_truncation`` False an input over the model window raises ``TextTooLongError``."""
        info = self._info
        if not self.strategy.serves("classify"):
            raise UnsupportedOperationError(f"the model {info.name} is a {self.kind.value}, not a classifier")
        keys = [("label", item) if isinstance(item, str) else ("label-pair", *item) for item in inputs]

        def tokenize(positions: list[int]) -> list[Windows]:
            texts = [p for p in positions if isinstance(inputs[p], str)]
            pairs = [p for p in positions if not isinstance(inputs[p], str)]
            encoded = dict(
                zip(texts, self._backend.tokenize_texts([str(inputs[p]) for p in texts]), strict=True)
            )
            paired = self._backend.tokenize_pairs([tuple(inputs[p]) for p in pairs])  # type: ignore[misc]
            encoded.update(zip(pairs, paired, strict=True))
            return [Windows([encoded[p]], encoded[p].truncated) for p in positions]

        def refuse(position: int) -> None:
            raise TextTooLongError(position, info.max_length)

        computed = await self._compute(keys, tokenize, None if allow_truncation else refuse, background)
        logits = np.stack([output[0] for output in computed.outputs]).astype(np.float64)
        scores = label_scores(logits, info.multi_label)
        return ClassifyOutcome(logits, scores, computed.tokens, len(computed.truncated), computed.timing)

    async def _static_queries(
        self, texts: list[str], allow_truncation: bool, refuse: Callable[[int], None]
    ) -> EmbedOutcome:
        """An inference-free sparse model's queries: each token's weight from the static table
        (what its SparseStaticEmbedding computes), no model batch."""
        weights = self._backend.query_weights
        assert weights is not None
        started = time.perf_counter()
        # As SparseStaticEmbedding tokenizes: no special tokens, cut at the model's length.
        spans = await asyncio.to_thread(self._backend.token_spans, texts, False)
        limit = self._info.max_length
        cut = [i for i, tokens in enumerate(spans) if len(tokens) > limit]
        if cut and not allow_truncation:
            refuse(cut[0])
        vectors = np.zeros((len(spans), len(weights)), dtype=np.float32)
        for row, tokens in zip(vectors, spans, strict=True):
            ids = np.unique(np.fromiter((token.id for token in tokens[:limit]), dtype=np.int64))
            row[ids] = weights[ids]
        tokens_seen = sum(min(len(tokens), limit) for tokens in spans)
        timing = Timing(0.0, (time.perf_counter() - started) * 1000.0, 0)
        return EmbedOutcome(vectors, tokens_seen, len(cut), timing)

    def is_query(self, prompt_name: str | None, input_type: str | None) -> bool:
        """Whether a sparse request's texts are queries (``prompt_name`` "query", ``input_type``
        query / search_query): an inference-free model weights those by its table."""
        return prompt_name == "query" or input_type in ("query", "search_query")

    @property
    def inference_free(self) -> bool:
        return self._backend.query_weights is not None

    async def embed_tokens(
        self, texts: Sequence[str], allow_truncation: bool = True, prompt: str | None = None
    ) -> tuple[list[np.ndarray], int, Timing]:
        """Per text, one vector per token the model saw (special and prompt tokens included),
        before pooling or normalisation: the hidden states, ``[tokens, hidden]`` each."""
        info = self._info
        if self._token_controller is None:
            able = self.strategy.token_vectors
            why = "its backend does not answer them" if able else f"a {self.kind.value} model has none"
            raise UnsupportedOperationError(
                f"the model {info.name} ({self.kind.value} on {info.backend}) cannot give token vectors: "
                f"{why}; BACKEND=torch serves them for bi-encoders"
            )
        if prompt is None:
            prompt = self.embed_prompt(None, None)
        arrived_at = asyncio.get_running_loop().time()
        trace, tokenizing = current_trace.get(), time.perf_counter()
        encoded = await asyncio.to_thread(self._backend.tokenize_texts, [prompt + text for text in texts])
        if trace is not None:
            trace.tokenized(tokenizing, len(texts))
        cut = next((i for i, item in enumerate(encoded) if item.truncated), None)
        if cut is not None and not allow_truncation:
            raise TextTooLongError(cut, info.max_length)
        result = await self._token_controller.run(
            encoded, self._timeout_s, False, "REQUEST_TIMEOUT_S", arrived_at, traced=trace is not None
        )
        if trace is not None:
            trace.inferred(result, info)
        timing = Timing(result.queue_ms, result.inference_ms, result.batch_size, 0, result.batches)
        return list(result.outputs), sum(len(item) for item in encoded), timing

    def check_instruction(self, instruction: str | None) -> None:
        """InvalidInputError (422) for an instruction given to a model that takes none."""
        if instruction is not None and self._template is None:
            raise InvalidInputError(f"instruction: the model {self._info.name} takes no instruction")

    def scoring_query(self, query: str, instruction: str | None = None) -> str:
        """What a cross-encoder pairs documents with: the query, or an instruction-style reranker's
        query part of its template."""
        return self._template.query_part(query, instruction) if self._template is not None else query

    async def query_vector_of(self, query: str, background: bool = False) -> tuple[np.ndarray, int]:
        """The query vector a vector kind's rerank compares documents with (query prompt applied;
        normalised for a bi-encoder, a sparse model's weights as they are),
        and its tokens (which a rerank counts in its usage)."""
        prompt = query_prompt(self._info)
        normalize = self.strategy.normalizes  # a sparse model's query weights as they are
        outcome = await self.embed(
            [prompt + query], normalize=normalize, background=background, prompt="", query=True
        )
        return outcome.vectors[0], outcome.tokens

    @property
    def batch_limit(self) -> int:
        """The most items the controller's next batch may hold."""
        return self._controller.batch_limit

    def first_too_long(self, texts: Sequence[str], query: str | None = None) -> int | None:
        """The position of the first text the model would have to cut, or None: what a job with
        truncation off checks at submission. With ``query`` (a rerank): paired with it on a
        cross-encoder, behind the model's document prompt on a bi-encoder, as ``rerank`` runs it.
        Tokenizes: call off the event loop."""
        pairs = query is not None and self.strategy.inputs == "pairs"
        prefix = document_prompt(self._info) if query is not None and not pairs else ""
        step = 1024
        for start in range(0, len(texts), step):
            part = [prefix + text for text in texts[start : start + step]]
            if pairs:
                encoded = self._backend.tokenize_pairs([(query, text) for text in part])
            else:
                encoded = self._backend.tokenize_texts(part)
            for offset, item in enumerate(encoded):
                if item.truncated:
                    return start + offset
        return None

    def first_too_long_input(self, inputs: Sequence[str | tuple[str, str]]) -> int | None:
        """A classifier's first input (a text or a pair) the model would have to cut, or None.
        Tokenizes (texts and pairs each in one call per step): call off the event loop."""
        step = 1024
        for start in range(0, len(inputs), step):
            chunk = list(inputs[start : start + step])
            texts = [i for i, item in enumerate(chunk) if isinstance(item, str)]
            pairs = [i for i, item in enumerate(chunk) if not isinstance(item, str)]
            encoded = zip(texts, self._backend.tokenize_texts([str(chunk[i]) for i in texts]), strict=True)
            paired = self._backend.tokenize_pairs([(chunk[i][0], chunk[i][1]) for i in pairs])
            cut = [i for i, item in [*encoded, *zip(pairs, paired, strict=True)] if item.truncated]
            if cut:
                return start + min(cut)
        return None

    @property
    def max_tokens(self) -> int:
        return self._info.max_length

    @property
    def dimension(self) -> int:
        """The model's vector size (a sparse model's: its vocabulary)."""
        return int(self._info.dimension or 0)

    @property
    def labels(self) -> tuple[str, ...]:
        """A classifier's label names, in label-index order."""
        return self._info.labels

    def truncate_texts(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens (tokenizes: call off the event loop)."""
        return [self._backend.truncate_text(text, max_tokens) for text in texts]

    def keep_ends(self, texts: Sequence[str], prompt: str = "") -> tuple[list[str], int]:
        """Each text too long for the model window (behind ``prompt``) without its beginning, and
        how many were cut: what Cohere's ``truncate: START`` and TEI's ``truncation_direction:
        left`` ask. A text is cut where a word begins (before the space a byte-level BPE token
        carries, after the space a WordPiece one follows), so the tokens it keeps are the ones it
        ended with; a text with no such place in reach (one long word, or a script written without
        spaces) is cut at a token boundary instead. Tokenizes: call off the event loop."""
        window, kept, cut = self._info.max_length, [], 0
        for text in texts:
            end = self._keep_end(text, prompt, window)
            kept.append(end)
            cut += end != text
        return kept, cut

    def _keep_end(self, text: str, prompt: str, window: int) -> str:
        while True:  # each pass cuts at least one token's characters: it ends
            whole = prompt + text
            [spans] = self._backend.token_spans([whole])
            if len(spans) <= window:
                return text
            own = [span for span in spans if not span.special and span.start >= len(prompt)]
            if len(own) < 2:
                return text  # nothing to cut but the whole text: left to the model's own cut
            first = own[min(len(spans) - window, len(own) - 1)]
            at = next((start for start in _word_starts(whole, own) if start >= first.start), first.start)
            if at <= own[0].start:  # tokens of one character share its offsets: cut past it
                later = [span.start for span in own if span.start > own[0].start]
                if not later:
                    return text
                at = later[0]
            text = whole[at:]

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[TokenSpan]]:
        """Every token of each text as the loaded model's tokenizer cuts it, untruncated
        (UnsupportedOperationError for a backend without one). Tokenizes: call off the event loop."""
        return self._backend.token_spans(texts, add_special_tokens)

    def embed_prompt(self, prompt_name: str | None, input_type: str | None) -> str:
        """The prompt text a request's ``prompt_name`` / ``input_type`` select (UnknownPromptError: 422)."""
        return embed_prompt(self._info, prompt_name, input_type, self.default_prompt_name)

    def _refuse_document(self, position: int) -> None:
        raise TextTooLongError(position, self._info.max_length)

    async def embed(
        self,
        texts: Sequence[str],
        normalize: bool | None = None,
        allow_truncation: bool = True,
        background: bool = False,
        prompt: str | None = None,
        query: bool = False,
    ) -> EmbedOutcome:
        """Embed ``texts``; ``normalize`` None follows the model's own configuration. ``query``: on
        an inference-free sparse model, the texts are queries, weighted by its static table (no
        model run); documents (the default) go through the model.

        ``prompt``: the text prepended to each (prompts.embed_prompt); None: the default prompt
        (DEFAULT_PROMPT_NAME, else the model's default_prompt_name, else none).
        With ``allow_truncation`` False a text longer than the model window raises
        ``TextTooLongError`` naming its position, before any model work.
        """
        info = self._info
        if not self.strategy.embeds:
            raise UnsupportedOperationError(
                f"the loaded model {info.name} is a {self.kind.value}: it {self.strategy.does} and "
                "cannot embed; "
                "use /rerank or /predict, or serve a bi-encoder"
            )
        if prompt is None:
            prompt = self.embed_prompt(None, None)
        if prompt:
            texts = [prompt + text for text in texts]

        def refuse(position: int) -> None:
            raise TextTooLongError(position, info.max_length)

        if query and self._backend.query_weights is not None:
            return await self._static_queries(list(texts), allow_truncation, refuse)

        keys = [("text", text) for text in texts]
        computed = await self._compute(
            keys,
            lambda positions: self._windows(list(texts), positions, TRUNCATE),
            None if allow_truncation else refuse,
            background,
        )
        if computed.timing.batches > 1:
            log.info("Processed %d texts in %d model batches", len(texts), computed.timing.batches)
        rows = computed.rows
        vectors = rows if rows is not None else np.stack([output[0] for output in computed.outputs])
        vectors = vectors.astype(np.float32, copy=False)
        if self.strategy.normalizes and (info.normalize_embeddings if normalize is None else normalize):
            vectors = l2_normalize(vectors)  # a sparse model's weights are never normalised
        return EmbedOutcome(vectors, computed.tokens, len(computed.truncated), computed.timing)


def _word_starts(whole: str, spans: Sequence[TokenSpan]) -> list[int]:
    """Where a word begins among ``spans``: a token that starts with a space (byte-level BPE keeps
    it: cut before it) or follows one (WordPiece, SentencePiece: cut at it)."""
    starts = []
    for span in spans:
        if span.start > 0 and (whole[span.start - 1].isspace() or whole[span.start].isspace()):
            starts.append(span.start)
    return starts
