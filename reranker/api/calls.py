"""Neutral calls: what a request asks the engine, whatever vendor's dialect it came in.

A dialect's ``parse`` (api/pipeline.py) turns its vendor's body into one of these; the pipeline
checks the call's limits, runs it on the chosen model and hands what it answers to the
dialect's ``render``. No field has a default: a dialect states every feature (an instruction,
a prompt, a Matryoshka cut, details...), so one that forgets a feature does not construct its
call. Labels and ``because`` only name things in messages (``input.3``, ``truncate is false``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import numpy as np

from reranker.api.schemas import check_embed_limits, check_limits
from reranker.api.text_limits import check_dimensions, document_tokens, fit_inputs, fit_rerank, fit_texts
from reranker.engine.model import ServedModel
from reranker.engine.quantize import encode_types
from reranker.engine.service import (
    ClassifyOutcome,
    EmbedOutcome,
    InferenceService,
    LongDocuments,
    RerankOutcome,
    Timing,
    l2_normalize,
)
from reranker.errors import InvalidInputError
from reranker.settings import Settings

Cut = Literal["end", "start"]


def too_long(label: str, max_tokens: int, because: str, note: str = "") -> str:
    return f"{label}: longer than the model's {max_tokens}-token window{note} and {because}"


def is_sparse(model: ServedModel) -> bool:
    return model.info is not None and model.info.strategy.serves("embed_sparse")


@dataclass(frozen=True, slots=True)
class Prompt:
    """Which of the model's prompts an embedding request chose (engine/prompts.py)."""

    name: str | None  # prompt_name: one of the model's prompts
    input_type: str | None  # a role (query, search_document...) or a prompt name
    own_types: tuple[str, ...]  # input types taking the model's prompt of that name if it has one, else none

    def resolve(self, model: ServedModel, service: InferenceService) -> tuple[str, bool]:
        """The prompt text (an unknown one: 422 listing the model's), and whether the texts are
        queries, which an inference-free sparse model weights by its static table (no prompt)."""
        if self.input_type is not None and self.input_type in self.own_types:
            prompts = model.info.prompts if model.info else {}
            return prompts.get(self.input_type, ""), False
        query = service.inference_free and service.is_query(self.name, self.input_type)
        return ("" if query else service.embed_prompt(self.name, self.input_type)), query


@dataclass(frozen=True, slots=True)
class Reranked:
    outcome: RerankOutcome
    cut: list[int]  # documents cut at max_tokens_per_doc

    @property
    def timing(self) -> Timing:
        return self.outcome.timing


@dataclass(frozen=True, slots=True)
class RerankCall:
    """Score ``documents`` for ``query``; ``long`` says what a document over the window becomes."""

    query: str
    documents: list[str]  # the text each document is ranked by
    long: LongDocuments
    instruction: str | None  # instruction-style rerankers; None: the model's default
    max_tokens_per_doc: int | None  # document tokens beyond this are cut before scoring (None: no cut)
    top_n: int | None
    raw_scores: bool
    return_documents: bool
    return_details: bool
    top_field: str  # the field that set top_n
    labels: tuple[str, str]  # the query's and the documents' fields
    because: str  # what turned truncation off (long.mode "refuse")

    @property
    def items(self) -> int:
        return len(self.documents)

    def check(self, settings: Settings) -> None:
        check_limits(settings, self.query, self.documents, self.top_n, self.top_field)

    async def run(self, model: ServedModel, settings: Settings) -> Reranked:
        service = model.require_service()
        window = service.max_tokens
        budget = document_tokens(self.long, window)
        per_doc = self.max_tokens_per_doc
        if per_doc is not None:
            budget = min(per_doc, budget or per_doc)
        query, fitted = fit_rerank(
            settings, self.query, self.documents, window, budget, self.because, self.labels
        )
        texts, cut = fitted, []
        if per_doc is not None:
            texts = await asyncio.to_thread(service.truncate_texts, fitted, per_doc)
            cut = [
                i for i, (text, original) in enumerate(zip(texts, fitted, strict=True)) if text != original
            ]
        outcome = await service.rerank(query, texts, self.long, instruction=self.instruction)
        return Reranked(outcome, cut)

    def too_long(self, position: int, max_tokens: int) -> str:
        return too_long(f"{self.labels[1]}.{position}", max_tokens, self.because, " (query included)")


@dataclass(frozen=True, slots=True)
class Embedded:
    outcome: EmbedOutcome
    vectors: np.ndarray  # the outcome's, cut to ``dimensions`` when asked
    codes: dict[str, np.ndarray]  # per asked encoding, the vectors in it
    cut_at_start: int  # texts whose beginning was cut (``cut_from`` "start")

    @property
    def truncated(self) -> int:
        """Texts the model did not see whole, cut at either end."""
        return self.outcome.truncated + self.cut_at_start

    @property
    def timing(self) -> Timing:
        return self.outcome.timing


@dataclass(frozen=True, slots=True)
class _TextsCall:
    """What every call on single texts states: the texts, their prompt, how a long one is cut."""

    texts: list[str]
    prompt: Prompt
    truncate: bool  # False: a text over the window is a 422 naming it
    cut_from: Cut  # which end of a text over the window is cut
    labels: list[str]  # each text's name in messages
    because: str  # what turned truncation off

    @property
    def items(self) -> int:
        return len(self.texts)

    def check(self, settings: Settings) -> None:
        check_embed_limits(settings, self.texts)


@dataclass(frozen=True, slots=True)
class EmbedCall(_TextsCall):
    """Embed ``texts`` (dense or sparse, by the model) with the prompt the request chose."""

    normalize: bool | None  # None: the model's own configuration
    dimensions: int | None  # keep the first N (Matryoshka), re-normalised unless normalize is False
    max_tokens: int | None  # the tokens the caller allows per text: under the window is a 422
    encodings: tuple[str, ...]  # quantized forms wanted (engine/quantize.py), beside the floats
    dimensions_field: str

    async def run(self, model: ServedModel, settings: Settings) -> Embedded:
        service = model.require_service()
        check_dimensions(self.dimensions_field, self.dimensions, model.info.dimension if model.info else None)
        if self.max_tokens is not None and self.max_tokens < service.max_tokens:
            raise InvalidInputError(
                f"max_tokens: {self.max_tokens} is below the model's {service.max_tokens}-token window; "
                "only the window itself is supported (omit max_tokens)"
            )
        if self.encodings and is_sparse(model):
            raise InvalidInputError(
                f"embedding_type {self.encodings[0]}: a sparse model answers indices and values; "
                "omit embedding_type"
            )
        prompt, query = self.prompt.resolve(model, service)
        texts, cut_at_start = await fit_to_window(self, service, settings, prompt)
        outcome = await service.embed(
            texts, normalize=self.normalize, allow_truncation=self.truncate, prompt=prompt, query=query
        )
        vectors = outcome.vectors
        if self.dimensions and self.dimensions < vectors.shape[1]:
            vectors = vectors[:, : self.dimensions]
            vectors = vectors if self.normalize is False else l2_normalize(vectors)
        codes = await encode_types(model, vectors, self.encodings) if self.encodings else {}
        return Embedded(outcome, vectors, codes, cut_at_start)

    def too_long(self, position: int, max_tokens: int) -> str:
        return f"{self.labels[position]}: longer than the model's {max_tokens} tokens and {self.because}"


Input = str | tuple[str, str]


@dataclass(frozen=True, slots=True)
class ClassifyCall:
    """Label scores of each input, a text or a (text, text) pair, by a classifier."""

    inputs: list[Input]
    truncate: bool
    raw_scores: bool
    field: str  # the inputs' field, in messages
    because: str

    @property
    def items(self) -> int:
        return len(self.inputs)

    def check(self, settings: Settings) -> None:
        check_embed_limits(
            settings, [t for item in self.inputs for t in ([item] if isinstance(item, str) else item)]
        )

    async def run(self, model: ServedModel, settings: Settings) -> ClassifyOutcome:
        service = model.require_service()
        budget = service.max_tokens if self.truncate else None
        inputs = fit_inputs(settings, self.inputs, self.field, budget, self.because)
        return await service.classify(inputs, allow_truncation=self.truncate)

    def too_long(self, position: int, max_tokens: int) -> str:
        return too_long(f"{self.field}.{position}", max_tokens, self.because)


@dataclass(frozen=True, slots=True)
class TokenVectors:
    vectors: list[np.ndarray]  # per text, [tokens, hidden]
    tokens: int
    timing: Timing


@dataclass(frozen=True, slots=True)
class TokenVectorsCall(_TextsCall):
    """Per text, one vector per token the model saw, before pooling (late interaction)."""

    async def run(self, model: ServedModel, settings: Settings) -> TokenVectors:
        service = model.require_service()
        prompt, _ = self.prompt.resolve(model, service)
        texts, _ = await fit_to_window(self, service, settings, prompt)
        return TokenVectors(*await service.embed_tokens(texts, self.truncate, prompt))

    def too_long(self, position: int, max_tokens: int) -> str:
        return too_long(self.labels[position], max_tokens, self.because)


async def fit_to_window(
    call: _TextsCall, service: InferenceService, settings: Settings, prompt: str
) -> tuple[list[str], int]:
    """The call's texts as the model is given them: cut to MAX_TEXT_CHARS (text_limits.py) and,
    when the call cuts a long text's beginning, to the window behind ``prompt`` (keep_ends); with
    how many lost their beginning."""
    budget = service.max_tokens if call.truncate else None
    start = call.cut_from == "start"
    texts = fit_texts(settings, call.texts, call.labels, budget, call.because, keep_end=start)
    if call.truncate and start:
        return await asyncio.to_thread(service.keep_ends, texts, prompt)
    return texts, 0


Call = RerankCall | EmbedCall | ClassifyCall | TokenVectorsCall
Outcome = Reranked | Embedded | ClassifyOutcome | TokenVectors


def labelled(prefix: str, count: int) -> list[str]:
    return [f"{prefix}.{i}" for i in range(count)]
