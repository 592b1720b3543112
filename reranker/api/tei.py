"""Hugging Face text-embeddings-inference (TEI) dialect, at the server root: TEI clients work
with this server's address as their base URL.

- ``POST /rerank`` with ``{"query", "texts", ...}`` (ours has ``documents``) and ``POST /embed``
  with ``{"inputs", ...}`` (ours has ``chunks``): ``rerank.py`` and ``embed.py`` choose this
  module's dialects (``RERANK`` / ``EMBED``) for such a body (``is_tei_rerank`` / ``is_tei_embed``).
- ``POST /`` (what ``huggingface_hub.InferenceClient(base_url).feature_extraction`` posts),
  ``GET /info`` and ``POST /tokenize``: TEI only.

Errors of these requests are TEI's ``{"error", "error_type"}`` (``dialects.py``). Unlike TEI, a
text longer than the model window is truncated unless the request says ``"truncate": false``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from reranker import __version__
from reranker.api.body import read_json, validate
from reranker.api.calls import Cut, EmbedCall, Embedded, Prompt, RerankCall, Reranked, labelled
from reranker.api.dialects import TEI, speak
from reranker.api.observe import model_of, runtime_of
from reranker.api.pipeline import Dialect, Rendering, choosing
from reranker.api.responses import ORJSONResponse, json_response
from reranker.api.schemas import _Body, check_embed_limits
from reranker.api.text_limits import fit_texts
from reranker.backends.base import TokenSpan
from reranker.engine.rerank_results import ranked, scores_of
from reranker.engine.service import LongDocuments
from reranker.settings import Settings

REFUSED = "truncate is false"


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
    truncation_direction: Literal["right", "left"] = Field(
        "right", description="left: a text over the model window loses its beginning instead of its end."
    )

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

    @property
    def cut_from(self) -> Cut:
        return "start" if self.truncation_direction == "left" else "end"


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


def parse_rerank(body: TeiRerankRequest, settings: Settings) -> RerankCall:
    return RerankCall(
        query=body.query,
        documents=body.texts,
        long=LongDocuments("truncate" if body.truncate else "refuse"),
        instruction=None,  # TEI's body has none: the model's default
        max_tokens_per_doc=None,
        top_n=None,
        raw_scores=body.raw_scores,
        return_documents=body.return_text,
        return_details=False,
        top_field="top_n",
        labels=("query", "texts"),
        because=REFUSED,
    )


def render_rerank(r: Rendering[TeiRerankRequest, RerankCall, Reranked]) -> list[dict[str, Any]]:
    """A bare list ``[{"index", "score", "text"?}]``, best first."""
    outcome, call = r.result.outcome, r.call
    scores = scores_of(outcome, call.raw_scores)
    results: list[dict[str, Any]] = []
    for index in ranked(outcome, None):
        result: dict[str, Any] = {"index": index, "score": float(scores[index])}
        if call.return_documents:
            result["text"] = r.body.texts[index]
        results.append(result)
    return results


def parse_embed(body: TeiEmbedRequest, settings: Settings) -> EmbedCall:
    texts = body.texts()
    return EmbedCall(
        texts=texts,
        prompt=Prompt(body.prompt_name, None, ()),  # neither: the default prompt, if any
        normalize=body.normalize,
        truncate=body.truncate,
        cut_from=body.cut_from,
        dimensions=body.dimensions,  # TEI: cut, then normalise if normalize
        max_tokens=None,
        encodings=(),
        labels=labelled("inputs", len(texts)),
        dimensions_field="dimensions",
        because=REFUSED,
    )


def render_embed(r: Rendering[TeiEmbedRequest, EmbedCall, Embedded]) -> list[np.ndarray]:
    """``[[float, ...], ...]``, one vector per input."""
    return list(r.result.vectors)


RERANK = Dialect(TeiRerankRequest, "rerank", parse_rerank, render_rerank, speaks=TEI)
EMBED = Dialect(TeiEmbedRequest, "embed", parse_embed, render_embed, speaks=TEI)


def _task_of(request: Request, data: Any) -> tuple[Dialect[Any, Any, Any], Any]:
    """``POST /``: TEI serves its model's task here (the first model's; ``/models/{name}/``: that
    model's): a classifier predicts, a sparse model answers /embed_sparse, a reranker reranks,
    a bi-encoder embeds. ``huggingface_hub``'s ``InferenceClient`` posts ``{"inputs", "parameters":
    {...}}``; the parameters apply as if at the root."""
    from reranker.api import classify, sparse

    runtime = runtime_of(request)
    in_path = request.path_params.get("model_name")
    info = (runtime.named(in_path) if in_path is not None else runtime.default).info
    kind = info.strategy if info is not None else None  # None: loading (the embed route says 503)
    classifier = kind is not None and kind.serves("classify")
    if isinstance(data, dict) and isinstance(data.get("parameters"), dict) and not classifier:
        data = {**data["parameters"], **{k: v for k, v in data.items() if k != "parameters"}}
    if classifier:
        # huggingface_hub's text_classification (it sends "parameters") reads [[...]], the
        # Inference API's shape; TEI's flat list would give its caller the top label only.
        nested = isinstance(data, dict) and "parameters" in data and isinstance(data.get("inputs"), str)
        if nested:
            data = {key: value for key, value in data.items() if key != "parameters"}
            data["inputs"] = [[data["inputs"]]]
        return classify.PREDICT, data
    if kind is not None and kind.serves("embed_sparse"):
        return sparse.TEI_SPARSE, data
    if kind is not None and kind.serves("rerank") and not kind.embeds:
        return RERANK, data
    return EMBED, data


root = choosing(_task_of, speaks=TEI)


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
    output = model.strategy.output
    if output == "vector":
        model_type = {"embedding": {"pooling": model.details.get("pooling", "mean")}}
    elif output == "weights":
        model_type = {"embedding": {"pooling": "splade"}}
    elif output == "labels":
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
