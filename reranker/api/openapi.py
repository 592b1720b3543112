"""GET /openapi.json: every endpoint, its request and response schemas and its errors.

The request schemas are the pydantic models that validate the requests
(``schemas.py``), with this server's configured limits written in (``maxItems``,
``maximum``), so a client generated from the document knows them. MAX_TEXT_CHARS is no
``maxLength``: a request that truncates has a longer text cut, not refused (text_limits.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from reranker import __version__
from reranker.api import response_models as out
from reranker.api.responses import ORJSONResponse
from reranker.api.schemas import (
    CohereRerankRequest,
    CohereV2RerankRequest,
    EmbedRequest,
    JobRequest,
    OpenAIEmbeddingRequest,
    RerankRequest,
    RunRequest,
)
from reranker.settings import Settings

REF = "#/components/schemas/{model}"
INFERENCE_ERRORS = {
    400: "Malformed JSON, or an operation the loaded model cannot do (embed on a cross-encoder).",
    401: "API keys are configured and the request has no valid `Authorization: Bearer <key>`.",
    404: "No such job (never submitted, evicted after JOB_RESULT_TTL_S, or another API key's).",
    408: "The body did not arrive within BODY_READ_TIMEOUT_S.",
    413: "The body is over MAX_REQUEST_BYTES, too many texts for one request, or more model time than "
    "MAX_REQUEST_SECONDS: use /v1/jobs.",
    415: "The body's Content-Type is not JSON: send `Content-Type: application/json`.",
    422: "The body breaks the schema or a limit; the message names the field and the limit.",
    429: "MAX_ACTIVE_JOBS jobs are queued or running: retry after `Retry-After` seconds.",
    500: "The model failed while running the batch, or a task the server needs stopped.",
    503: "Overloaded (queue full, or MAX_REQUEST_SECONDS with the work ahead), loading, draining, or "
    "(jobs) the job store unavailable: retry after `Retry-After` seconds.",
    504: "None of the request's batches started or finished within REQUEST_TIMEOUT_S.",
}


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    summary: str
    response: type[BaseModel]
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    text_response: bool = False  # also answers text/plain (Prometheus)
    ok_status: int = 200
    keyed: bool = True  # needs the API key when keys are configured (probes and docs do not)


ERRORS = tuple(status for status in INFERENCE_ERRORS if status not in (404, 429))
JOB_SUBMIT_ERRORS = (400, 401, 408, 413, 415, 422, 429, 503)
JOB_ERRORS = (401, 404, 503)
OPERATIONS = (
    Operation("/rerank", "post", "Rerank documents for a query", out.RerankResponse, RerankRequest, ERRORS),
    Operation(
        "/v1/rerank",
        "post",
        "Rerank, Cohere v1 / Jina shape",
        out.CohereRerankResponse,
        CohereRerankRequest,
        ERRORS,
    ),
    Operation(
        "/v2/rerank", "post", "Rerank, Cohere v2 shape", out.V2RerankResponse, CohereV2RerankRequest, ERRORS
    ),
    Operation(
        "/embed", "post", "Embed chunks (ingestion-worker shape)", out.EmbedResponse, EmbedRequest, ERRORS
    ),
    Operation(
        "/v1/embeddings",
        "post",
        "Embed texts, OpenAI shape",
        out.OpenAIEmbeddingResponse,
        OpenAIEmbeddingRequest,
        ERRORS,
    ),
    Operation(
        "/health",
        "get",
        "Status, model, controller and cache (503 unless ready)",
        out.HealthResponse,
        keyed=False,
    ),
    Operation("/livez", "get", "Liveness: the process answers", out.StatusResponse, keyed=False),
    Operation("/readyz", "get", "Readiness: 200 only when the model serves", out.StatusResponse, keyed=False),
    Operation(
        "/v1/jobs",
        "post",
        "Submit an embed or rerank job (the body of /embed or /v1/rerank as input)",
        out.JobAccepted,
        JobRequest,
        JOB_SUBMIT_ERRORS,
        ok_status=202,
    ),
    Operation(
        "/v1/jobs/{job_id}", "get", "A job's status, progress and output", out.JobView, errors=JOB_ERRORS
    ),
    Operation(
        "/v1/jobs/{job_id}",
        "delete",
        "Cancel a queued or running job; delete a finished one",
        out.JobView,
        errors=JOB_ERRORS,
    ),
    Operation(
        "/run",
        "post",
        "RunPod: submit an embed or rerank job; answers its id at once",
        out.RunPodJob,
        RunRequest,
        JOB_SUBMIT_ERRORS,
    ),
    Operation(
        "/runsync",
        "post",
        "RunPod: submit a job and wait up to RUNSYNC_WAIT_S for its output (else its id to poll)",
        out.RunPodJob,
        RunRequest,
        JOB_SUBMIT_ERRORS,
    ),
    Operation("/status/{id}", "get", "RunPod: a job's status and output", out.RunPodJob, errors=JOB_ERRORS),
    Operation(
        "/cancel/{id}",
        "post",
        "RunPod: cancel a queued or running job (a finished one is left as it is)",
        out.RunPodJob,
        errors=JOB_ERRORS,
    ),
    Operation("/models", "get", "The served model, its kind and limits", out.ModelList, keyed=False),
    Operation("/v1/models", "get", "The same, for OpenAI's models.list()", out.ModelList, keyed=False),
    Operation("/info", "get", "Text-embeddings-inference's model info", out.TeiInfo, keyed=False),
    Operation(
        "/metrics",
        "get",
        "Metrics: JSON, or Prometheus text with ?format=prometheus",
        out.MetricsResponse,
        errors=(400, 401),
        text_response=True,
        keyed=False,
    ),
)


def openapi_document(settings: Settings, protected: bool) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, settings, protected, schemas)
    _write_limits(schemas, settings)
    schemas["ErrorResponse"] = _schema(out.ErrorResponse, schemas, "serialization")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "reranker", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if protected:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document


async def openapi_json(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = openapi_document(state.runtime.settings, state.api_keys is not None)
    return ORJSONResponse(state.openapi)


def _operation(op: Operation, settings: Settings, protected: bool, schemas: dict[str, Any]) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": _schema(op.response, schemas, "serialization")}}
    if op.text_response:
        ok["text/plain"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {str(op.ok_status): {"description": "OK", "content": ok}}
    error = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    for status in op.errors:
        if status == 401 and not (protected and (op.keyed or settings.protect_metrics)):
            continue
        responses[str(status)] = {"description": INFERENCE_ERRORS.get(status, "Bad query"), "content": error}
    if op.path in ("/health", "/readyz"):
        responses["503"] = {"description": "Not ready (loading, unhealthy or draining)", "content": ok}
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.method + "_" + re.sub(r"[^a-z0-9]+", "_", op.path).strip("_"),
        "responses": responses,
    }
    if op.path == "/metrics":
        format_schema = {"type": "string", "enum": ["json", "prometheus"]}
        operation["parameters"] = [
            {"name": "format", "in": "query", "required": False, "schema": format_schema}
        ]
    for name in re.findall(r"\{(\w+)\}", op.path):
        job_id = {"type": "string", "description": "The job id POST /v1/jobs or /run answered."}
        operation["parameters"] = [{"name": name, "in": "path", "required": True, "schema": job_id}]
    if op.request is not None:
        schema = _schema(op.request, schemas, "validation")
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if protected and (op.keyed or (op.path == "/metrics" and settings.protect_metrics)):
        operation["security"] = [{"bearer": []}]
    return operation


def _schema(model: type[BaseModel], schemas: dict[str, Any], mode: str) -> dict[str, Any]:
    """Register ``model`` (and the models it uses) under components; return a $ref to it."""
    schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _write_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The configured limits, on the fields they bound (arrays: count; integers: maximum)."""
    docs, texts = settings.max_documents_per_request, settings.max_texts_per_embed_request
    bounds = {  # field: (maxItems, maxLength, maximum)
        "documents": (docs, None, None),
        "chunks": (texts, None, None),
        "input": (texts, None, None),
        "top_n": (None, None, docs),
        "top_k": (None, None, docs),
    }
    for schema in schemas.values():
        for name, field in schema.get("properties", {}).items():
            if name in bounds:
                _constrain(field, *bounds[name])


def _constrain(
    node: dict[str, Any], max_items: int | None, max_length: int | None, maximum: int | None
) -> None:
    for branch in node.get("anyOf", []):
        _constrain(branch, max_items, max_length, maximum)
    kind = node.get("type")
    if kind == "string" and max_length:
        node["maxLength"] = max_length
    elif kind == "array":
        if max_items:
            node["maxItems"] = max_items
        if isinstance(node.get("items"), dict):
            _constrain(node["items"], None, max_length, None)
    elif kind == "integer" and maximum:
        node["maximum"] = maximum
