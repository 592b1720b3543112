"""POST /v2/embed and POST /v1/embed: Cohere's embed, its request and response shapes.

Texts only. ``input_type`` picks the model's prompt as on /v1/embeddings (search_query and
search_document: its query or document prompt; classification and clustering: its prompt of
that name, else none). ``embedding_types`` are float, int8, uint8, binary, ubinary and base64
(the float32 bytes; engine/quantize.py); floats are normalised, as Cohere's are.
``truncate``: END (default) cuts a text's end at the model window, START its beginning (at a word
boundary: service.keep_ends), NONE refuses a longer text with a 422 naming it.
"""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from reranker.api.calls import EmbedCall, Embedded, Prompt, labelled
from reranker.api.pipeline import Dialect, Rendering, handler
from reranker.api.schemas import MODEL_FIELD, _Body
from reranker.engine.quantize import EmbeddingType
from reranker.errors import InvalidInputError
from reranker.settings import Settings

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
        description="float, int8, uint8 (ranges fixed per model: /health), binary, ubinary, base64.",
    )
    truncate: Literal["NONE", "START", "END"] = Field(
        "END",
        description="END: cut the end at the model window; START: cut the beginning; NONE: 422 if longer.",
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
    base64: list[str] | None = None


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


def parse(body: _CohereEmbedRequest, settings: Settings, version: str) -> EmbedCall:
    texts = body.text_inputs()
    plain = version == "1" and body.embedding_types is None  # v1: plain floats
    return EmbedCall(
        texts=texts,
        prompt=Prompt(None, body.input_type, OWN_PROMPT_TYPES),
        normalize=True,  # Cohere's floats are normalised
        truncate=body.truncate != "NONE",
        cut_from="start" if body.truncate == "START" else "end",
        dimensions=getattr(body, "output_dimension", None),
        max_tokens=getattr(body, "max_tokens", None),
        encodings=() if plain else tuple(dict.fromkeys(body.embedding_types or ["float"])),
        labels=labelled("texts", len(texts)),
        dimensions_field="output_dimension",
        because="truncate is NONE",
    )


def render(r: Rendering[_CohereEmbedRequest, EmbedCall, Embedded], version: str) -> dict[str, Any]:
    outcome = r.result.outcome
    meta: dict[str, Any] = {
        "api_version": {"version": version},
        "billed_units": {"input_tokens": outcome.tokens},
    }
    if r.result.truncated:
        window = r.model.require_service().max_tokens
        meta["warnings"] = [f"{r.result.truncated} of the texts were cut at the model's {window} tokens"]
    content: dict[str, Any] = {"id": str(uuid.uuid4()), "texts": r.body.texts or r.call.texts, "meta": meta}
    if r.call.encodings:
        content.update(embeddings={kind: list(rows) for kind, rows in r.result.codes.items()})
        content["response_type"] = "embeddings_by_type"
    else:
        content.update(embeddings=list(r.result.vectors), response_type="embeddings_floats")
    return content


V1 = Dialect(CohereV1EmbedRequest, "embed", partial(parse, version="1"), partial(render, version="1"))
V2 = Dialect(CohereV2EmbedRequest, "embed", partial(parse, version="2"), partial(render, version="2"))
embed_v1 = handler(V1)
embed_v2 = handler(V2)
