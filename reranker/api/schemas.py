"""Request bodies, validated by pydantic: the single source of truth for their shape.

Limits that depend on settings (documents or texts per request) are checked by
``check_limits`` and ``check_embed_limits`` after the shape is known, with the limit in the
message; characters per text by ``text_limits.py`` (a truncating request has a long text cut).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reranker.errors import InvalidInputError, PayloadTooLargeError
from reranker.settings import Settings


def _nullable_optionals(schema: dict[str, Any]) -> None:
    """Every optional property may be ``null`` in the document, as it may in a request."""
    required = set(schema.get("required", []))
    for name, field in schema.get("properties", {}).items():
        if name in required:
            continue
        branches = field.get("anyOf", [field])
        if not any(branch.get("type") == "null" for branch in branches):
            keep = {key: field.pop(key) for key in ("default", "description", "title") if key in field}
            field_copy = dict(field)
            field.clear()
            field.update({"anyOf": [field_copy, {"type": "null"}], **keep})


class _Body(BaseModel):
    """A request body. Unknown fields are ignored: SDKs send fields we do not use (e.g.
    max_chunks_per_doc). An optional field given ``null`` takes its default, as if absent:
    SDKs send ``null`` for what their caller left unset (langchain-cohere's max_tokens_per_doc)."""

    model_config = ConfigDict(
        extra="ignore", str_strip_whitespace=False, json_schema_extra=_nullable_optionals
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in cls.model_fields or cls.model_fields[key].is_required()
        }


def _require_text(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


class _QueryAndTextDocuments(_Body):
    """A non-empty query and a non-empty list of non-empty string documents."""

    query: str
    documents: list[str] = Field(min_length=1)

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return _require_text(value, "query")

    @field_validator("documents")
    @classmethod
    def _documents(cls, value: list[str]) -> list[str]:
        for index, doc in enumerate(value):
            if not doc.strip():
                raise ValueError(f"document {index} is empty")
        return value


class ScoringOptions(_Body):
    """What every rerank shape may ask of the scores (issue 16)."""

    raw_scores: bool = Field(
        False, description="Cross-encoders: the raw logit instead of the model's declared activation of it."
    )
    instruction: str | None = Field(
        None,
        min_length=1,
        description="Instruction-style rerankers (Qwen3-Reranker): the task instruction "
        "(default: the model's).",
    )


MODEL_FIELD = Field(None, description="A served model's name (GET /v1/models); absent: the first able to.")


class RerankRequest(_QueryAndTextDocuments, ScoringOptions):
    model: str | None = MODEL_FIELD
    top_k: int | None = Field(None, gt=0)
    top_n: int | None = Field(None, gt=0, description="Cohere's name for top_k (top_k wins over it).")
    return_documents: bool = False

    @property
    def limit(self) -> tuple[int | None, str]:
        """How many results to return, and the field that said so."""
        return (self.top_k, "top_k") if self.top_k is not None else (self.top_n, "top_n")


class LongDocumentOptions(ScoringOptions):
    """How /v1/rerank and /v2/rerank treat a document longer than the model window."""

    truncate: Literal["CHUNK", "END", "NONE"] | None = Field(
        None,
        description="CHUNK (default): the max over overlapping windows; END: score the beginning; "
        "NONE: 422 on a document over the window.",
    )
    max_chunks_per_doc: int | None = Field(None, ge=1, le=1000, description="Windows scored per document.")
    return_details: bool = Field(False, description="Per result: windows scored, chunked, truncated.")

    @field_validator("truncate", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class CohereRerankRequest(LongDocumentOptions):
    """Cohere v1 / Jina rerank: documents are strings or objects."""

    model: str | None = None
    query: str
    documents: list[str | dict[str, Any]] = Field(min_length=1)
    top_n: int | None = Field(None, gt=0)
    return_documents: bool = False
    rank_fields: list[str] | None = Field(None, min_length=1)

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return _require_text(value, "query")

    def texts(self) -> list[str]:
        """The text each document is ranked by (rank_fields joined, else its ``text``)."""
        return [self._text_of(index, doc) for index, doc in enumerate(self.documents)]

    def _text_of(self, index: int, doc: str | dict[str, Any]) -> str:
        if isinstance(doc, str):
            text = doc
        elif self.rank_fields:
            parts = []
            for name in self.rank_fields:
                value = doc.get(name)
                if value is not None and not isinstance(value, str):
                    raise InvalidInputError(f"documents.{index}.{name}: rank fields must be strings")
                if value:
                    parts.append(f"{name}: {value}")
            text = "\n".join(parts)
        else:
            text = doc.get("text")
            if not isinstance(text, str):
                raise InvalidInputError(
                    f"documents.{index}: an object document needs a string 'text' field (or give rank_fields)"
                )
        if not text.strip():
            raise InvalidInputError(f"documents.{index}: document is empty")
        return text


class CohereV2RerankRequest(_QueryAndTextDocuments, LongDocumentOptions):
    """Cohere v2 rerank: ``model`` required, documents are strings."""

    model: str = Field(min_length=1)
    top_n: int | None = Field(None, gt=0)
    max_tokens_per_doc: int = Field(4096, ge=1, description="Document tokens beyond this are not scored.")


def check_limits(
    settings: Settings, query: str, documents: list[str], top_n: int | None = None, top_name: str = "top_n"
) -> None:
    """Documents per request and ``top_n`` against the configured limits."""
    if top_n is not None and top_n > settings.max_documents_per_request:
        raise InvalidInputError(
            f"{top_name}: {top_n} is over MAX_DOCUMENTS_PER_REQUEST={settings.max_documents_per_request}"
        )
    if len(documents) > settings.max_documents_per_request:
        raise InvalidInputError(
            f"documents: {len(documents)} documents is over MAX_DOCUMENTS_PER_REQUEST="
            f"{settings.max_documents_per_request}"
        )


class _PromptChoice(_Body):
    """How an embedding request picks one of the model's prompts (engine/prompts.py)."""

    prompt_name: str | None = Field(None, min_length=1, description="One of the model's prompts (/health).")
    input_type: str | None = Field(
        None,
        min_length=1,
        description="Cohere's name: query/search_query or document/search_document select the model's "
        "query or document prompt (prompt_name wins).",
    )
    task: Any = Field(None, description="Not supported (Jina's): 422 naming prompt_name instead.")
    instruction: Any = Field(None, description="Not supported on embeddings: 422 naming prompt_name instead.")

    @field_validator("task", "instruction")
    @classmethod
    def _refused(cls, value: Any, info: Any) -> Any:
        if value is not None:
            raise ValueError(
                f"{info.field_name} is not supported on embeddings: choose one of the model's prompts "
                "with prompt_name (listed by /health) or input_type"
            )
        return value


class Chunk(_Body):
    chunk_id: str = Field(min_length=1)
    content: str


class EmbedRequest(_PromptChoice):
    """The ingestion-worker shape of POST /embed."""

    batch_id: str
    chunks: list[Chunk] = Field(min_length=1)
    model: str | None = MODEL_FIELD
    top_k: int | None = Field(
        None, gt=0, description="Sparse models: keep each chunk's largest top_k weights."
    )
    normalize: bool | None = None
    truncate: bool = True
    embedding_type: Literal["float", "int8", "uint8", "binary", "ubinary"] = Field(
        "float",
        description="What each vector holds: floats, int8/uint8 codes (of the normalised vector, "
        "ranges fixed per model: /health) or packed sign bits (binary, ubinary: dimension/8 values).",
    )

    @model_validator(mode="after")
    def _chunks_are_usable(self) -> EmbedRequest:
        first_seen: dict[str, int] = {}
        for index, chunk in enumerate(self.chunks):
            if not chunk.content.strip():
                raise ValueError(f"chunks.{index} (chunk_id {chunk.chunk_id!r}): content is empty")
            if chunk.chunk_id in first_seen:
                raise ValueError(
                    f"chunks.{index} (chunk_id {chunk.chunk_id!r}): duplicate chunk_id "
                    f"(first at chunks.{first_seen[chunk.chunk_id]})"
                )
            first_seen[chunk.chunk_id] = index
        return self


TOKEN_IDS_REFUSED = (
    "token ids are not supported: this server tokenizes text with its model's own tokenizer, and "
    "the ids a client counted (tiktoken's, for OpenAI's models) mean other tokens to it; send the "
    "text as a string or a list of strings (langchain-openai: "
    "OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
)


def _is_token_ids(value: Any) -> bool:
    """OpenAI's other ``input`` forms: a list of ints, or a list of lists of ints."""

    def is_id(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    if not isinstance(value, list):
        return False
    return any(is_id(item) or (isinstance(item, list) and item and all(map(is_id, item))) for item in value)


class OpenAIEmbeddingRequest(_PromptChoice):
    """The OpenAI shape of POST /v1/embeddings (text only: token ids are a 422 saying why)."""

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)

    @field_validator("input", mode="before")
    @classmethod
    def _not_token_ids(cls, value: Any) -> Any:
        if _is_token_ids(value):
            raise ValueError(TOKEN_IDS_REFUSED)
        return value

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must not be an empty list")
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"input {index} is empty")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def check_embed_limits(settings: Settings, texts: list[str]) -> None:
    """Texts per request against MAX_TEXTS_PER_EMBED_REQUEST (413)."""
    if len(texts) > settings.max_texts_per_embed_request:
        raise PayloadTooLargeError(
            f"{len(texts)} texts is over MAX_TEXTS_PER_EMBED_REQUEST={settings.max_texts_per_embed_request}; "
            "split the request or submit a job"
        )


class ClassifyJobInput(_Body):
    """A classify job's input: texts and pairs, as /predict's batch holds them."""

    inputs: list[str | list[str]] = Field(min_length=1)
    raw_scores: bool = False
    truncate: bool = True
    model: str | None = MODEL_FIELD

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: list[str | list[str]]) -> list[str | list[str]]:
        shaped: list[str | list[str]] = []
        for index, item in enumerate(value):
            texts = [item] if isinstance(item, str) else item
            if len(texts) not in (1, 2) or not all(text.strip() for text in texts):
                raise ValueError(f"inputs.{index}: a non-empty text, or [text] or [text, text]")
            shaped.append(texts[0] if len(texts) == 1 else list(texts))
        return shaped


class JobRequest(_Body):
    """POST /v1/jobs: ``input`` is the body of /embed or of /v1/rerank."""

    type: Literal["embed", "embed_sparse", "rerank", "classify"]
    input: dict[str, Any]


class RunRequest(BaseModel):
    """RunPod's POST /run and /runsync. Other top-level fields RunPod knows (``webhook``,
    ``policy``) are ignored. Documents the body; ``reranker.api.runpod.job_body`` tells the two
    inputs apart and /v1/jobs validates the one given."""

    input: EmbedRequest | CohereRerankRequest = Field(
        description="The body of /embed (an embed job) or of /v1/rerank (a rerank job)."
    )
