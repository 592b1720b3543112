"""The shapes of the responses, for /openapi.json (the handlers build them as plain dicts,
for speed; tests/test_openapi_fuzz.py checks every answer against these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel


class ErrorDetail(BaseModel):
    type: str = Field(description="Stable machine-readable kind, e.g. invalid_request, overloaded.")
    message: str = Field(description="What is wrong, naming the field or the limit.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Timings(BaseModel):
    queue: float
    inference: float
    total: float


class RerankResult(BaseModel):
    index: int
    score: float
    document: str | None = None


class RerankUsage(BaseModel):
    documents: int
    total_tokens: int
    truncated_documents: int


class RerankResponse(BaseModel):
    results: list[RerankResult]
    model: str
    usage: RerankUsage
    timing_ms: Timings
    warnings: list[str] | None = Field(None, description="Unknown fields of the request, ignored.")


class ResultDetails(BaseModel):
    windows: int = Field(description="Windows of the document scored (1 unless it was chunked).")
    chunked: bool
    truncated: bool = Field(description="Some of the document's text was not scored.")


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None
    details: ResultDetails | None = None


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class CohereMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    warnings: list[str] | None = None


class TokenUsage(BaseModel):
    total_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: CohereMeta
    usage: TokenUsage


class V2Result(BaseModel):
    index: int
    relevance_score: float
    details: ResultDetails | None = None


class Tokens(BaseModel):
    input_tokens: int
    output_tokens: int


class V2Meta(CohereMeta):
    tokens: Tokens


class V2RerankResponse(BaseModel):
    id: str
    results: list[V2Result]
    meta: V2Meta


class ChunkVector(BaseModel):
    chunk_id: str
    vector: list[float]


class EmbedUsage(BaseModel):
    chunks: int
    total_tokens: int
    truncated_chunks: int


class EmbedResponse(BaseModel):
    batch_id: str
    model: str
    dimension: int
    vectors: list[ChunkVector]
    usage: EmbedUsage
    timing_ms: Timings
    warnings: list[str] | None = Field(None, description="Unknown fields of the request, ignored.")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "loading", "unhealthy", "draining"]
    model: dict[str, Any]
    controller: dict[str, Any]
    cache: dict[str, Any]
    jobs: dict[str, Any] | None = None
    uptime_s: float
    error: str | None = None


class StatusResponse(BaseModel):
    status: str


class MetricsResponse(BaseModel):
    """Counters, histograms and gauges; see the README. Prometheus text with ?format=prometheus."""

    total_requests: int
    successful_requests: int
    status: str
    model_config = {"extra": "allow"}


class JobAccepted(BaseModel):
    job_id: str
    status: Literal["QUEUED"]
    status_url: str


class JobProgress(BaseModel):
    done: int
    total: int


class JobView(BaseModel):
    job_id: str
    type: Literal["embed", "rerank"]
    status: Literal["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]
    progress: JobProgress
    created_at: float
    started_at: float | None
    finished_at: float | None
    output: dict[str, Any] | None = Field(
        None, description="COMPLETED: the response /embed or /v1/rerank gives."
    )
    error: ErrorDetail | None = None


class RunPodJob(BaseModel):
    """RunPod's job status (POST /run, /runsync, /cancel/{id}; GET /status/{id})."""

    id: str
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]
    delayTime: int | None = Field(None, description="Milliseconds queued before the job started.")
    executionTime: int | None = Field(None, description="Milliseconds the job ran (once finished).")
    output: dict[str, Any] | None = Field(
        None, description="COMPLETED: the response /embed or /v1/rerank gives."
    )
    error: str | None = Field(None, description="FAILED: why (RunPod gives a string).")
    error_type: str | None = Field(None, description="FAILED: the stable kind, as in /v1/jobs.")


class ModelCard(BaseModel):
    """The served model: OpenAI's fields, Infinity's (``stats``, ``backend``, ``capabilities``),
    this server's kind and limits."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str = Field("reranker", description="Absent on /infinity/models (infinity-client's own).")
    backend: str
    capabilities: list[str]
    kind: str | None
    device: str | None
    max_input_length: int | None
    dimension: int | None
    dtype: str | None = None
    source: str | None = Field(None, description="What was loaded: a hub id or a local path.")
    limits: dict[str, int]
    stats: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TeiInfo(BaseModel):
    """Text-embeddings-inference's GET /info."""

    model_id: str
    model_type: dict[str, Any]
    max_input_length: int
    max_client_batch_size: int
    version: str
    model_config = {"extra": "allow"}


class TeiToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TeiTokens(RootModel[list[list[TeiToken]]]):
    """Text-embeddings-inference's POST /tokenize: per input, its tokens."""


class TeiVectors(RootModel[list[list[float]]]):
    """Text-embeddings-inference's POST / and POST /embed: one vector per input."""


class InfinityRerankResult(BaseModel):
    relevance_score: float
    index: int
    document: str | None = None


class InfinityRerankResponse(BaseModel):
    object: Literal["rerank"]
    results: list[InfinityRerankResult]
    model: str
    usage: OpenAIUsage
    id: str
    created: int


class InfinityEmbeddingResponse(OpenAIEmbeddingResponse):
    id: str
    created: int


class Landing(BaseModel):
    """GET / (JSON unless the client asks for HTML): what runs here and where to look."""

    service: Literal["reranker"]
    version: str
    status: str
    model: dict[str, Any]
    models: list[dict[str, Any]]
    links: dict[str, str]


class SparseValue(BaseModel):
    index: int
    value: float


class TeiSparse(RootModel[list[list[SparseValue]]]):
    """Text-embeddings-inference's POST /embed_sparse: per input, its non-zero weights by index."""


class Prediction(BaseModel):
    score: float
    label: str


class Predictions(RootModel[list[Prediction] | list[list[Prediction]]]):
    """Text-embeddings-inference's POST /predict: every label, best first (one list per batch item)."""


class InfinityClassifyResponse(BaseModel):
    object: Literal["classify"]
    data: list[list[Prediction]]
    model: str
    usage: OpenAIUsage
    id: str
    created: int


class TokenVectors(RootModel[list[list[list[float]]]]):
    """Text-embeddings-inference's POST /embed_all: per input, per token, its hidden state."""
