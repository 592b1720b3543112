"""POST /v2/embed and POST /v1/embed: Cohere's embed, its request and response shapes.

Texts only. ``input_type`` picks the model's prompt as on /v1/embeddings (search_query and
search_document: its query or document prompt; classification and clustering: its prompt of
that name, else none). ``embedding_types`` are float, int8, uint8, binary and ubinary
(engine/quantize.py); floats are normalised, as Cohere's are. ``truncate``: END (default) cuts
at the model window, NONE refuses a longer text with a 422 naming it, START is refused (422).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_body, unless_disconnected
from reranker.api.observe import model_of, runtime_of, timing_headers
from reranker.api.responses import json_response
from reranker.api.schemas import MODEL_FIELD, _Body, check_embed_limits
from reranker.api.text_limits import check_dimensions, fit_texts
from reranker.engine.model import ServedModel
from reranker.engine.quantize import EmbeddingType, encode_types
from reranker.engine.service import EmbedOutcome, InferenceService, TextTooLongError, l2_normalize
from reranker.errors import InvalidInputError

TEXT_ONLY = "only text is supported here: give texts (images and image inputs are not embedded)"
OWN_PROMPT_TYPES = ("classification", "clustering")  # the model's prompt of that name, if any


class _CohereEmbedRequest(_Body):
    texts: list[str] | None = Field(None, min_length=1, description="The texts to embed.")
    images: list[str] | None = Field(None, description="Not supported: 422.")
    input_type: str | None = Field(
        None,
        description="search_document, search_query (the model's document or query prompt), "
        "classification, clustering (its prompt of that name, else none), or one of its prompt names.",
    )
    embedding_types: list[EmbeddingType] | None = Field(
        None,
        min_length=1,
        description="float, int8, uint8 (ranges fixed per model: /health), binary, ubinary.",
    )
    truncate: Literal["NONE", "START", "END"] = Field(
        "END",
        description="END: cut at the model window; NONE: 422 on a longer text; START: not supported (422).",
    )

    @field_validator("truncate", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def text_inputs(self) -> list[str]:
        if self.images:
            raise InvalidInputError(f"images: {TEXT_ONLY}")
        if self.input_type == "image":
            raise InvalidInputError(f"input_type image: {TEXT_ONLY}")
        if not self.texts:
            raise InvalidInputError("texts: give at least one text")
        for index, text in enumerate(self.texts):
            if not text.strip():
                raise InvalidInputError(f"texts.{index}: text is empty")
        return list(self.texts)


class CohereV1EmbedRequest(_CohereEmbedRequest):
    """Cohere v1 embed: without embedding_types the answer is plain floats."""

    model: str | None = MODEL_FIELD


class CohereV2EmbedRequest(_CohereEmbedRequest):
    """Cohere v2 embed: answers by type (float when embedding_types is absent)."""

    model: str = Field(min_length=1, description="A served model's name (GET /v1/models).")
    input_type: str = Field(
        min_length=1, description=_CohereEmbedRequest.model_fields["input_type"].description
    )
    inputs: list[dict[str, Any]] | None = Field(
        None, description="Text-only inputs: each input's text parts joined by a newline. Images: 422."
    )
    output_dimension: int | None = Field(
        None, gt=0, description="The first N dimensions, re-normalised (Matryoshka); over the model's: 422."
    )
    max_tokens: int | None = Field(None, gt=0, description="At least the model window, or 422.")

    def text_inputs(self) -> list[str]:
        if self.inputs is None:
            return super().text_inputs()
        if self.texts or self.images:
            raise InvalidInputError("inputs: give texts, images or inputs, not several")
        texts = []
        for index, item in enumerate(self.inputs):
            parts = item.get("content")
            if not isinstance(parts, list) or not parts:
                raise InvalidInputError(f"inputs.{index}.content: a non-empty list of content parts")
            if any(not isinstance(part, dict) or part.get("type") != "text" for part in parts):
                raise InvalidInputError(f"inputs.{index}: {TEXT_ONLY}")
            text = "\n".join(str(part.get("text") or "") for part in parts)
            if not text.strip():
                raise InvalidInputError(f"inputs.{index}: text is empty")
            texts.append(text)
        return texts


class ApiVersion(BaseModel):
    version: str


class EmbedBilledUnits(BaseModel):
    input_tokens: int


class CohereEmbedMeta(BaseModel):
    api_version: ApiVersion
    billed_units: EmbedBilledUnits
    warnings: list[str] | None = None


class EmbeddingsByType(BaseModel):
    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None


class CohereEmbedByTypeResponse(BaseModel):
    id: str
    embeddings: EmbeddingsByType
    texts: list[str]
    meta: CohereEmbedMeta
    response_type: Literal["embeddings_by_type"]


class CohereEmbedResponse(BaseModel):
    """v1: plain floats without embedding_types, else by type."""

    id: str
    embeddings: list[list[float]] | EmbeddingsByType
    texts: list[str]
    meta: CohereEmbedMeta
    response_type: Literal["embeddings_floats", "embeddings_by_type"]


async def embed_v2(request: Request) -> Response:
    return await _embed(request, CohereV2EmbedRequest, "2")


async def embed_v1(request: Request) -> Response:
    return await _embed(request, CohereV1EmbedRequest, "1")


async def _embed(request: Request, schema: type[_CohereEmbedRequest], version: str) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, schema, runtime.settings)
    texts = body.text_inputs()
    labels = [f"texts.{i}" for i in range(len(texts))]
    check_embed_limits(runtime.settings, texts)
    model = model_of(request, body.model, "embed")
    service = model.require_service()
    if body.truncate == "START":
        raise InvalidInputError("truncate: START is not supported; use END (cut the end) or NONE (refuse)")
    dimension = model.info.dimension if model.info else None
    output_dimension = getattr(body, "output_dimension", None)
    check_dimensions("output_dimension", output_dimension, dimension)
    max_tokens = getattr(body, "max_tokens", None)
    if max_tokens is not None and max_tokens < service.max_tokens:
        raise InvalidInputError(
            f"max_tokens: {max_tokens} is below the model's {service.max_tokens}-token window; "
            "only the window itself is supported (omit max_tokens)"
        )
    refuse = body.truncate == "NONE"
    texts = fit_texts(
        runtime.settings, texts, labels, None if refuse else service.max_tokens, "truncate is NONE"
    )
    outcome = await _run(request, service, texts, labels, _prompt(model, service, body.input_type), refuse)
    vectors = outcome.vectors
    if output_dimension is not None and output_dimension < vectors.shape[1]:
        vectors = l2_normalize(vectors[:, :output_dimension])
    meta: dict[str, Any] = {
        "api_version": {"version": version},
        "billed_units": {"input_tokens": outcome.tokens},
    }
    if outcome.truncated:
        meta["warnings"] = [
            f"{outcome.truncated} of the texts were cut at the model's {service.max_tokens} tokens"
        ]
    content: dict[str, Any] = {"id": str(uuid.uuid4()), "texts": body.texts or texts, "meta": meta}
    if version == "1" and body.embedding_types is None:
        content.update(embeddings=list(vectors), response_type="embeddings_floats")
    else:
        types = list(dict.fromkeys(body.embedding_types or ["float"]))
        codes = await encode_types(model, vectors, types)
        content.update(embeddings={kind: list(rows) for kind, rows in codes.items()})
        content["response_type"] = "embeddings_by_type"
    return await json_response(content, headers=timing_headers(request, outcome.timing, started, len(texts)))


def _prompt(model: ServedModel, service: InferenceService, input_type: str | None) -> str:
    """The prompt ``input_type`` selects (Cohere's classification and clustering: the model's
    prompt of that name when it has one, else none)."""
    if input_type in OWN_PROMPT_TYPES:
        prompts = model.info.prompts if model.info else {}
        return prompts.get(input_type, "")
    return service.embed_prompt(None, input_type)


async def _run(
    request: Request,
    service: InferenceService,
    texts: list[str],
    labels: list[str],
    prompt: str,
    refuse: bool,
) -> EmbedOutcome:
    try:
        return await unless_disconnected(
            request, service.embed(texts, normalize=True, allow_truncation=not refuse, prompt=prompt)
        )
    except TextTooLongError as exc:
        raise InvalidInputError(
            f"{labels[exc.position]}: longer than the model's {exc.max_tokens} tokens and truncate is NONE"
        ) from None
