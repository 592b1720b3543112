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
    model_name: str = Field(EMBEDDED_MODEL, min_length=1)
    local_model_path: str | None = None
    models: str | None = None  # several models: NAME=SOURCE,... (model_specs.py); overrides MODEL_NAME
    models_file: str | None = None  # several models with settings of their own: YAML or JSON list
    model_kind: ModelKindSetting = "auto"
    model_task: ModelTaskSetting = "auto"  # a one-label sequence classifier: reranker (auto) or classifier
    device_preference: DevicePreference = "auto"
    use_mlx: bool = False
    backend: BackendSetting = "auto"
    dtype: DtypeSetting = "auto"  # auto: the hardware's native half precision, else float32 (selection.py)
    half_precision_min_agreement: float = Field(0.999, gt=0, le=1)  # precision.py: the start-up floor
    onnx_cache_dir: str | None = None
    onnx_quantize: OnnxQuantize = "none"
    onnx_int8_min_agreement: float = Field(0.98, gt=0, le=1)
    # Model families (issue 16)
    max_model_length: int | None = Field(None, ge=8)  # caps the model's own max length
    trust_remote_code: bool = False  # models whose config.json has auto_map (their own Python code)
    default_prompt_name: str | None = None  # prompt applied to /embed texts without prompt_name
    rerank_window_tokens: int | None = Field(None, ge=16)  # bi-encoder rerank windows; None: max length

    # Concurrency controller
    max_parallel_requests: int = Field(1, ge=1, le=64)
    max_queue_size: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1, le=4096)
    max_batch_tokens: int = Field(16_384, ge=1)
    batch_wait_ms: float = Field(0.0, ge=0, le=1000)
    batch_length_grouping: bool = True
    request_timeout_s: float = Field(30.0, gt=0)
    max_request_seconds: float = Field(300.0, ge=0)  # 0: no estimate-based refusal
    inference_threads: int = Field(0, ge=0, le=1024)  # 0: from the CPUs this process may use
    shutdown_timeout_s: float = Field(30.0, gt=0)

    # Embeddings and adaptive batching
    embedding_max_memory_percent: float = Field(70.0, gt=0, le=100)
    embedding_max_batch_size: int = Field(64, ge=1, le=4096)
    embedding_adaptive_batching: bool = True
    max_texts_per_embed_request: int = Field(10_000, ge=1)
    embedding_calibration_file: str | None = None  # int8/uint8 embedding ranges: texts, one per line

    # Long documents in /v1/rerank and /v2/rerank
    max_chunks_per_doc: int = Field(10, ge=1, le=1000)
    chunk_overlap_tokens: int = Field(32, ge=0, le=256)

    # Asynchronous jobs
    max_active_jobs: int = Field(4, ge=1)
    job_result_ttl_s: float = Field(3600.0, gt=0)
    job_store_dir: str | None = None
    job_backend: JobBackendSetting = "local"  # redis: one queue shared by every instance
    redis_url: str = Field("redis://127.0.0.1:6379/0", min_length=1)
    redis_job_queue: str = Field("reranker", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    job_lease_s: float = Field(30.0, ge=0.5, le=3600)  # redis: a silent worker's job moves on
    job_max_attempts: int = Field(3, ge=1, le=100)  # redis: deliveries before a job is failed
    max_job_request_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_texts_per_job: int = Field(200_000, ge=1)
    runsync_wait_s: float = Field(90.0, ge=0, le=3600)  # RunPod's /runsync waits about 90 s

    # Prediction cache
    enable_prediction_cache: bool = False
    prediction_cache_size: int = Field(10_000, ge=1)
    prediction_cache_ttl_s: float = Field(3600.0, ge=0)

    # HTTP
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)
    header_read_timeout_s: float = Field(10.0, gt=0)
    keepalive_timeout_s: float = Field(5.0, gt=0)
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    max_connections: int = Field(1024, ge=1)
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    log_request_bodies: bool = False

    # Authentication
    api_keys: SecretStr | None = None
    api_keys_file: str | None = None
    protect_metrics: bool = False

    # Request limits
    max_documents_per_request: int = Field(1000, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    max_request_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    body_read_timeout_s: float = Field(10.0, gt=0)

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
