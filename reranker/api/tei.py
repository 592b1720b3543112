"""Hugging Face text-embeddings-inference (TEI) dialect, at the server root: TEI clients work
with this server's address as their base URL.

- ``POST /rerank`` with ``{"query", "texts", ...}`` (ours has ``documents``) and ``POST /embed``
  with ``{"inputs", ...}`` (ours has ``chunks``): ``rerank.py`` and ``embed.py`` hand such a body
  here (``is_tei_rerank`` / ``is_tei_embed``).
- ``POST /`` (what ``huggingface_hub.InferenceClient(base_url).feature_extraction`` posts),
  ``GET /info`` and ``POST /tokenize``: TEI only.

Errors of these requests are TEI's ``{"error", "error_type"}`` (``dialects.py``). Unlike TEI, a
text longer than the model window is truncated unless the request says ``"truncate": false``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from reranker import __version__
from reranker.api.body import read_json, unless_disconnected, validate
from reranker.api.dialects import TEI, speak
from reranker.api.observe import model_of, runtime_of, timing_headers
from reranker.api.responses import ORJSONResponse, json_response
from reranker.api.schemas import _Body, check_embed_limits, check_limits
from reranker.api.text_limits import check_dimensions, fit_rerank, fit_texts
from reranker.backends.base import ModelKind, TokenSpan
from reranker.engine.service import LongDocuments, TextTooLongError, l2_normalize
from reranker.errors import InvalidInputError

T = TypeVar("T")


def _non_empty(texts: list[str], what: str) -> list[str]:
    for index, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"{what} {index} is empty")
    return texts


class _TeiOptions(_Body):
    truncate: bool = Field(True, description="false: a text over the model window is a 422 (TEI's default).")
    truncation_direction: Literal["right"] = Field("right", description="Only right truncation is supported.")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class TeiRerankRequest(_TeiOptions):
    query: str = Field(min_length=1)
    texts: list[str] = Field(min_length=1)
    raw_scores: bool = Field(False, description="The raw logit instead of its sigmoid (cross-encoders).")
    return_text: bool = False

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        return _non_empty(value, "text")


class TeiInputs(_TeiOptions):
    inputs: str | list[str]

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("inputs must not be an empty list")
        _non_empty(texts, "input")
        return value

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class TeiEmbedRequest(TeiInputs):
    normalize: bool = True
    prompt_name: str | None = Field(None, description="A prompt of the model's configuration, prepended.")
    dimensions: int | None = Field(
        None, gt=0, description="Keep the first N values (Matryoshka), then normalise if normalize is true."
    )


class TeiTokenizeRequest(_Body):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


def is_tei_rerank(data: Any) -> bool:
    return isinstance(data, dict) and "texts" in data and "documents" not in data


def is_tei_embed(data: Any) -> bool:
    return isinstance(data, dict) and "inputs" in data and "chunks" not in data


async def long_refused(work: Awaitable[T], what: str, max_length: int) -> T:
    try:
        return await work
    except TextTooLongError as exc:
        raise InvalidInputError(
            f"{what}.{exc.position}: longer than the model's {max_length}-token window and truncate is false"
        ) from None


async def rerank(request: Request, data: Any, started: float) -> Response:
    """TEI's ``POST /rerank``: a bare list ``[{"index", "score", "text"?}]``, best first."""
    speak(request, TEI)
    runtime = runtime_of(request)
    body = validate(TeiRerankRequest, data)
    check_limits(runtime.settings, body.query, body.texts)
    service = model_of(request, None, "rerank").require_service()
    window = service.max_tokens
    budget = window if body.truncate else None
    query, texts = fit_rerank(
        runtime.settings, body.query, body.texts, window, budget, "truncate is false", ("query", "texts")
    )
    long = LongDocuments("truncate" if body.truncate else "refuse")
    work = unless_disconnected(request, service.rerank(query, texts, long))
    outcome = await long_refused(work, "texts", _window(request))
    scores = outcome.ranking if body.raw_scores else outcome.scores
    results: list[dict[str, Any]] = []
    for index in np.argsort(-outcome.ranking, kind="stable"):
        result: dict[str, Any] = {"index": int(index), "score": float(scores[index])}
        if body.return_text:
            result["text"] = body.texts[index]
        results.append(result)
    headers = timing_headers(request, outcome.timing, started, len(body.texts))
    return ORJSONResponse(results, headers=headers)


async def embed(request: Request, data: Any, started: float) -> Response:
    """TEI's ``POST /embed``: ``[[float, ...], ...]``, one vector per input."""
    speak(request, TEI)
    runtime = runtime_of(request)
    body = validate(TeiEmbedRequest, data)
    texts = body.texts()
    check_embed_limits(runtime.settings, texts)
    served = model_of(request, None, "embed")
    service = served.require_service()
    budget = service.max_tokens if body.truncate else None
    labels = [f"inputs.{i}" for i in range(len(texts))]
    texts = fit_texts(runtime.settings, texts, labels, budget, "truncate is false")
    model = served.info
    check_dimensions("dimensions", body.dimensions, model.dimension if model else None)
    prompt = service.embed_prompt(body.prompt_name, None)  # None: the default prompt, if any
    work = unless_disconnected(
        request, service.embed(texts, normalize=body.normalize, allow_truncation=body.truncate, prompt=prompt)
    )
    outcome = await long_refused(work, "inputs", _window(request))
    vectors = outcome.vectors
    if body.dimensions is not None and body.dimensions < vectors.shape[1]:  # TEI: cut, then normalise
        vectors = vectors[:, : body.dimensions]
        vectors = l2_normalize(vectors) if body.normalize else vectors
    headers = timing_headers(request, outcome.timing, started, len(texts))
    return await json_response(list(vectors), headers=headers)


async def root(request: Request) -> Response:
    """``POST /``: TEI serves its model's task here (the first model's; ``/models/{name}/``: that
    model's): a classifier predicts, a sparse model answers /embed_sparse, a reranker reranks,
    a bi-encoder embeds. ``huggingface_hub``'s ``InferenceClient`` posts ``{"inputs", "parameters":
    {...}}``; the parameters apply as if at the root."""
    from reranker.api import classify, sparse

    started = time.perf_counter()
    speak(request, TEI)
    runtime = runtime_of(request)
    settings = runtime.settings
    data = await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s)
    in_path = request.path_params.get("model_name")
    kind = (runtime.named(in_path) if in_path is not None else runtime.default).info
    classifier = kind is not None and kind.kind is ModelKind.CLASSIFIER
    if isinstance(data, dict) and isinstance(data.get("parameters"), dict) and not classifier:
        data = {**data["parameters"], **{k: v for k, v in data.items() if k != "parameters"}}
    if classifier:
        # huggingface_hub's text_classification (it sends "parameters") reads [[...]], the
        # Inference API's shape; TEI's flat list would give its caller the top label only.
        nested = isinstance(data, dict) and "parameters" in data and isinstance(data.get("inputs"), str)
        if nested:
            data = {key: value for key, value in data.items() if key != "parameters"}
            data["inputs"] = [[data["inputs"]]]
        return await classify.predict(request, data, started)
    if kind is not None and kind.kind is ModelKind.SPARSE:
        return await sparse.embed_sparse(request, data, started)
    if kind is not None and kind.kind is ModelKind.CROSS_ENCODER:
        return await rerank(request, data, started)
    return await embed(request, data, started)


async def info(request: Request) -> Response:
    """TEI's ``GET /info``: the model and this server's limits."""
    runtime = runtime_of(request)
    in_path = request.path_params.get("model_name")
    served = runtime.named(in_path) if in_path is not None else runtime.default
    settings = served.settings
    served.require_service()  # loading or failed: 503, not made-up facts
    model = served.info
    assert model is not None
    model_type: dict[str, Any]
    if model.kind is ModelKind.BI_ENCODER:
        model_type = {"embedding": {"pooling": model.details.get("pooling", "mean")}}
    elif model.kind is ModelKind.SPARSE:
        model_type = {"embedding": {"pooling": "splade"}}
    elif model.kind is ModelKind.CLASSIFIER:
        id2label = {str(i): label for i, label in enumerate(model.labels)}
        model_type = {
            "classifier": {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}
        }
    else:
        model_type = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    content = {
        "model_id": served.name,
        "model_sha": None,
        "model_dtype": model.dtype,
        "model_type": model_type,
        "max_concurrent_requests": settings.max_queue_size,
        "max_input_length": model.max_length,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_batch_requests": settings.batch_size,
        "max_client_batch_size": settings.max_texts_per_embed_request,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
    return ORJSONResponse(content)


async def tokenize(request: Request) -> Response:
    """TEI's ``POST /tokenize``: per input, its tokens with their offsets in the input, as the
    loaded model's tokenizer cuts them (in a worker thread: up to MAX_TEXTS_PER_EMBED_REQUEST texts)."""
    speak(request, TEI)
    runtime = runtime_of(request)
    settings = runtime.settings
    data = await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s)
    body = validate(TeiTokenizeRequest, data)
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    check_embed_limits(settings, texts)
    labels = [f"inputs.{i}" for i in range(len(texts))]
    fit_texts(settings, texts, labels, None, "/tokenize shows every token")
    service = model_of(request, None, "any").require_service()
    if body.prompt_name is not None:
        prompt = service.embed_prompt(body.prompt_name, None)  # one the model lacks: 422 listing its own
        texts = [prompt + text for text in texts]

    def shown() -> list[list[dict[str, Any]]]:
        spans = service.token_spans(texts, body.add_special_tokens)
        return [_tokens(text, tokens) for text, tokens in zip(texts, spans, strict=True)]

    return await json_response(await asyncio.to_thread(shown))


def _tokens(text: str, spans: list[TokenSpan]) -> list[dict[str, Any]]:
    tokens = []
    for span in spans:
        if span.special:
            tokens.append({"id": span.id, "text": span.token, "special": True, "start": None, "stop": None})
        else:
            shown = text[span.start : span.stop]
            tokens.append(
                {"id": span.id, "text": shown, "special": False, "start": span.start, "stop": span.stop}
            )
    return tokens


def _window(request: Request) -> int:
    model = request.state.model.info
    return model.max_length if model else 0
