"""The one table of endpoints: it makes the Starlette routes, /openapi.json and the metric names.

Each row says where an endpoint lives, what it takes and answers (the pydantic models that
validate its request and describe its response), its errors, and how /metrics counts it:
``INFERENCE`` (latency histogram and window), ``JOB`` (counted, not timed) or not at all. A row
with ``per_model`` is also served under ``/models/{model_name}`` for that one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel
from starlette.routing import BaseRoute, Mount, Route

from reranker.api import (
    classify,
    cohere_embed,
    docs,
    embed,
    embed_all,
    health,
    infinity,
    jobs,
    landing,
    rerank,
    runpod,
    sparse,
    tei,
)
from reranker.api import response_models as out
from reranker.api.observe import Handler, observed
from reranker.api.openapi import openapi_json
from reranker.api.schemas import (
    CohereRerankRequest,
    CohereV2RerankRequest,
    EmbedRequest,
    JobRequest,
    OpenAIEmbeddingRequest,
    RerankRequest,
    RunRequest,
)


class Counted(Enum):
    INFERENCE = "inference"  # counted, and its latency observed
    JOB = "job"  # counted by status and failure reason; a poll's duration is no inference latency
    NOT = "not"  # probes, docs, metrics


@dataclass(frozen=True)
class Endpoint:
    path: str
    method: str
    handler: Handler
    summary: str
    response: type[BaseModel] | None  # None: not in /openapi.json (HTML and static files)
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    counted: Counted = Counted.NOT
    per_model: bool = False  # also at /models/{model_name}{path}, for that model
    ok_status: int = 200
    keyed: bool = True  # needs the API key when keys are configured (probes and docs do not)
    text_response: bool = False  # also answers text/plain (Prometheus)


# Errors each kind of endpoint documents (statuses: api/errors.py, their meanings: openapi.py).
INFERENCE_ERRORS = (400, 401, 404, 408, 413, 415, 422, 500, 503, 504)
JOB_SUBMIT_ERRORS = (400, 401, 404, 408, 413, 415, 422, 429, 503)
JOB_ERRORS = (401, 404, 503)

ENDPOINTS: tuple[Endpoint, ...] = (
    # This server's own shapes and Cohere's.
    Endpoint(
        "/rerank",
        "POST",
        rerank.rerank,
        "Rerank documents for a query",
        out.RerankResponse,
        RerankRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/v1/rerank",
        "POST",
        rerank.rerank_v1,
        "Rerank, Cohere v1 / Jina shape",
        out.CohereRerankResponse,
        CohereRerankRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/v2/rerank",
        "POST",
        rerank.rerank_v2,
        "Rerank, Cohere v2 shape",
        out.V2RerankResponse,
        CohereV2RerankRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/embed",
        "POST",
        embed.embed,
        "Embed chunks (ingestion-worker shape)",
        out.EmbedResponse,
        EmbedRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/v2/embed",
        "POST",
        cohere_embed.embed_v2,
        "Embed texts, Cohere v2 shape (embedding_types: float, int8, uint8, binary, ubinary, base64)",
        cohere_embed.CohereEmbedByTypeResponse,
        cohere_embed.CohereV2EmbedRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/v1/embed",
        "POST",
        cohere_embed.embed_v1,
        "Embed texts, Cohere v1 shape (floats, or by type with embedding_types)",
        cohere_embed.CohereEmbedResponse,
        cohere_embed.CohereV1EmbedRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    # OpenAI's.
    Endpoint(
        "/v1/embeddings",
        "POST",
        embed.openai_embeddings,
        "Embed texts, OpenAI shape",
        out.OpenAIEmbeddingResponse,
        OpenAIEmbeddingRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    # Jobs, and RunPod's serverless routes over the same jobs.
    Endpoint(
        "/v1/jobs",
        "POST",
        jobs.submit_job,
        "Submit an embed or rerank job (the body of /embed or /v1/rerank as input)",
        out.JobAccepted,
        JobRequest,
        JOB_SUBMIT_ERRORS,
        Counted.JOB,
        per_model=True,
        ok_status=202,
    ),
    Endpoint(
        "/v1/jobs/{job_id}",
        "GET",
        jobs.job_status,
        "A job's status, progress and output",
        out.JobView,
        errors=JOB_ERRORS,
        counted=Counted.JOB,
    ),
    Endpoint(
        "/v1/jobs/{job_id}",
        "DELETE",
        jobs.cancel_job,
        "Cancel a queued or running job; delete a finished one",
        out.JobView,
        errors=JOB_ERRORS,
        counted=Counted.JOB,
    ),
    Endpoint(
        "/run",
        "POST",
        runpod.run,
        "RunPod: submit an embed or rerank job; answers its id at once",
        out.RunPodJob,
        RunRequest,
        JOB_SUBMIT_ERRORS,
        Counted.JOB,
        per_model=True,
    ),
    Endpoint(
        "/runsync",
        "POST",
        runpod.runsync,
        "RunPod: submit a job and wait up to RUNSYNC_WAIT_S for its output (else its id to poll)",
        out.RunPodJob,
        RunRequest,
        JOB_SUBMIT_ERRORS,
        Counted.JOB,
        per_model=True,
    ),
    Endpoint(
        "/status/{id}",
        "GET",
        runpod.status,
        "RunPod: a job's status and output",
        out.RunPodJob,
        errors=JOB_ERRORS,
        counted=Counted.JOB,
    ),
    Endpoint(
        "/cancel/{id}",
        "POST",
        runpod.cancel,
        "RunPod: cancel a queued or running job (a finished one is left as it is)",
        out.RunPodJob,
        errors=JOB_ERRORS,
        counted=Counted.JOB,
    ),
    # Hugging Face text-embeddings-inference's (its /rerank and /embed bodies share ours: tei.py).
    Endpoint(
        "/",
        "POST",
        tei.root,
        "Text-embeddings-inference: the model's task (feature extraction)",
        out.TeiVectors,
        tei.TeiEmbedRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/tokenize",
        "POST",
        tei.tokenize,
        "Text-embeddings-inference: the model's tokens of each input",
        out.TeiTokens,
        tei.TeiTokenizeRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/embed_sparse",
        "POST",
        sparse.embed_sparse_route,
        "Text-embeddings-inference: sparse (SPLADE) weights of each input",
        out.TeiSparse,
        sparse.TeiSparseRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/embed_all",
        "POST",
        embed_all.embed_all,
        "Text-embeddings-inference: every token's vector of each input, before pooling",
        out.TokenVectors,
        sparse.TeiSparseRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/predict",
        "POST",
        classify.predict_route,
        "Text-embeddings-inference: a classifier's label scores of a text, a pair, or a batch",
        out.Predictions,
        classify.PredictRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        "/info",
        "GET",
        tei.info,
        "Text-embeddings-inference's model info",
        out.TeiInfo,
        keyed=False,
        per_model=True,
    ),
    # Infinity's, under a prefix (its /rerank body is ours, its answer Cohere-like: infinity.py).
    Endpoint(
        infinity.PREFIX + "/rerank",
        "POST",
        infinity.rerank,
        "Infinity: rerank",
        out.InfinityRerankResponse,
        infinity.InfinityRerankRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        infinity.PREFIX + "/embeddings",
        "POST",
        infinity.embeddings,
        "Infinity: embed",
        out.InfinityEmbeddingResponse,
        infinity.InfinityEmbeddingRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        infinity.PREFIX + "/classify",
        "POST",
        classify.infinity_classify,
        "Infinity: a classifier's label scores of each text",
        out.InfinityClassifyResponse,
        classify.InfinityClassifyRequest,
        INFERENCE_ERRORS,
        Counted.INFERENCE,
        per_model=True,
    ),
    Endpoint(
        infinity.PREFIX + "/models",
        "GET",
        infinity.infinity_models,
        "Infinity: the served models",
        out.ModelList,
        keyed=False,
    ),
    # Every model, and the server's state.
    Endpoint(
        "/models",
        "GET",
        infinity.models,
        "The served models, their kinds and limits",
        out.ModelList,
        keyed=False,
    ),
    Endpoint(
        "/v1/models",
        "GET",
        infinity.models,
        "The same, for OpenAI's models.list()",
        out.ModelList,
        keyed=False,
    ),
    Endpoint(
        "/health",
        "GET",
        health.health,
        "Status, models, controller and cache (503 unless ready)",
        out.HealthResponse,
        keyed=False,
    ),
    Endpoint("/livez", "GET", health.livez, "Liveness: the process answers", out.StatusResponse, keyed=False),
    Endpoint(
        "/readyz",
        "GET",
        health.readyz,
        "Readiness: 200 only when every model serves",
        out.StatusResponse,
        keyed=False,
    ),
    Endpoint(
        "/metrics",
        "GET",
        health.metrics,
        "Metrics: JSON, or Prometheus text with ?format=prometheus",
        out.MetricsResponse,
        errors=(400, 401),
        keyed=False,
        text_response=True,
    ),
    Endpoint("/", "GET", landing.root, "What runs here (HTML for a browser)", out.Landing, keyed=False),
    Endpoint("/openapi.json", "GET", openapi_json, "This document", None, keyed=False),
    Endpoint("/docs", "GET", docs.docs_page, "Swagger UI", None, keyed=False),
    Endpoint(docs.STATIC_PREFIX + "{name}", "GET", docs.docs_static, "Swagger UI's files", None, keyed=False),
)

METRIC_ENDPOINTS = tuple(dict.fromkeys(e.path for e in ENDPOINTS if e.counted is not Counted.NOT))


def _route(endpoint: Endpoint) -> Route:
    handler = endpoint.handler
    if endpoint.counted is not Counted.NOT:
        handler = observed(handler, endpoint.path, timed=endpoint.counted is Counted.INFERENCE)
    return Route(endpoint.path, handler, methods=[endpoint.method])


def routes() -> list[BaseRoute]:
    """Every endpoint; the per-model ones again under /models/{model_name}."""
    per_model: list[BaseRoute] = [_route(endpoint) for endpoint in ENDPOINTS if endpoint.per_model]
    return [*(_route(endpoint) for endpoint in ENDPOINTS), Mount("/models/{model_name}", routes=per_model)]
