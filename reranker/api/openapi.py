"""GET /openapi.json: every endpoint, its request and response schemas and its errors.

The request schemas are the pydantic models that validate the requests
(``schemas.py``), with this server's configured limits written in (``maxItems``,
``maximum``), so a client generated from the document knows them. MAX_TEXT_CHARS is no
``maxLength``: a request that truncates has a longer text cut, not refused (text_limits.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from reranker import __version__
from reranker.api import response_models as out
from reranker.api.responses import ORJSONResponse
from reranker.settings import Settings

if TYPE_CHECKING:
    from reranker.api.endpoints import Endpoint

REF = "#/components/schemas/{model}"
ERROR_MEANINGS = {
    400: "Malformed JSON, or an operation the chosen model cannot do (embed on a cross-encoder: the "
    "message names the models that can).",
    401: "API keys are configured and the request has no valid `Authorization: Bearer <key>`.",
    404: "No such model (the body's `model`, or /models/{name}/...: the message lists the served ones), "
    "or no such job (never submitted, evicted after JOB_RESULT_TTL_S, or another API key's).",
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


def openapi_document(settings: Settings, protected: bool) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    from reranker.api.endpoints import ENDPOINTS  # the table imports this module's handler

    for op in ENDPOINTS:
        if op.response is not None:
            paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, settings, protected, schemas)
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


def _operation(op: Endpoint, settings: Settings, protected: bool, schemas: dict[str, Any]) -> dict[str, Any]:
    assert op.response is not None
    ok: dict[str, Any] = {"application/json": {"schema": _schema(op.response, schemas, "serialization")}}
    if op.text_response:
        ok["text/plain"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {str(op.ok_status): {"description": "OK", "content": ok}}
    error = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    for status in op.errors:
        if status == 401 and not (protected and (op.keyed or settings.protect_metrics)):
            continue
        responses[str(status)] = {"description": ERROR_MEANINGS.get(status, "Bad query"), "content": error}
    if op.path in ("/health", "/readyz"):
        responses["503"] = {"description": "Not ready (loading, unhealthy or draining)", "content": ok}
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.method.lower() + "_" + re.sub(r"[^a-z0-9]+", "_", op.path).strip("_"),
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
