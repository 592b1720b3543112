"""Infinity's dialect under ``/infinity`` (infinity-client's ``base_url`` is
``http://HOST:PORT/infinity``), and the model list at ``GET /models`` and ``GET /v1/models``.

Infinity's routes have no ``/v1``; its ``/rerank`` takes ``{"query", "documents"}`` as this
server's own ``/rerank`` does, but answers in a Cohere-like shape, so it lives under a prefix
instead of being guessed from the body.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_body, unless_disconnected
from reranker.api.observe import model_of, runtime_of, timing_headers
from reranker.api.responses import ORJSONResponse, json_response
from reranker.api.schemas import OpenAIEmbeddingRequest, RerankRequest, check_embed_limits, check_limits
from reranker.api.text_limits import check_dimensions, fit_rerank, fit_texts
from reranker.engine.model import ServedModel
from reranker.engine.service import l2_normalize

PREFIX = "/infinity"


class InfinityRerankRequest(RerankRequest):
    raw_scores: bool = Field(False, description="The raw logit instead of its sigmoid (cross-encoders).")


class InfinityEmbeddingRequest(OpenAIEmbeddingRequest):
    dimensions: int | None = Field(None, ge=0, description="0 or absent: the model's dimension.")
    modality: Literal["text"] = "text"
    user: str | None = None


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


async def rerank(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, InfinityRerankRequest, runtime.settings)
    top_n, top_name = body.limit
    check_limits(runtime.settings, body.query, body.documents, top_n, top_name)
    model = model_of(request, body.model, "rerank")
    service = model.require_service()
    window = service.max_tokens  # Infinity truncates at the model window
    query, documents = fit_rerank(runtime.settings, body.query, body.documents, window, window, "")
    rerank_call = service.rerank(query, documents, instruction=body.instruction)
    outcome = await unless_disconnected(request, rerank_call)
    scores = outcome.ranking if body.raw_scores else outcome.scores
    order = np.argsort(-outcome.ranking, kind="stable")[: top_n or len(body.documents)]
    results: list[dict[str, Any]] = []
    for index in order:
        result: dict[str, Any] = {"relevance_score": float(scores[index]), "index": int(index)}
        if body.return_documents:
            result["document"] = body.documents[index]
        results.append(result)
    content = {
        "object": "rerank",
        "results": results,
        "model": model.name,
        "usage": _usage(outcome.tokens),
        "id": f"infinity-{uuid.uuid4()}",
        "created": int(time.time()),
    }
    headers = timing_headers(request, outcome.timing, started, len(body.documents))
    return ORJSONResponse(content, headers=headers)


async def embeddings(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    body = await read_body(request, InfinityEmbeddingRequest, runtime.settings)
    texts = body.texts()
    check_embed_limits(runtime.settings, texts)
    model = model_of(request, body.model, "embed")
    service = model.require_service()
    labels = [f"input.{i}" for i in range(len(texts))]
    texts = fit_texts(runtime.settings, texts, labels, service.max_tokens, "")  # always truncates
    check_dimensions("dimensions", body.dimensions, model.info.dimension if model.info else None)
    prompt = service.embed_prompt(body.prompt_name, body.input_type)  # an unknown one: 422
    outcome = await unless_disconnected(request, service.embed(texts, prompt=prompt))
    vectors = outcome.vectors
    if body.dimensions and body.dimensions < vectors.shape[1]:
        vectors = l2_normalize(vectors[:, : body.dimensions])
    data = [
        {"object": "embedding", "embedding": _encoded(vector, body.encoding_format), "index": index}
        for index, vector in enumerate(vectors)
    ]
    content = {
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": _usage(outcome.tokens),
        "id": f"infinity-{uuid.uuid4()}",
        "created": int(time.time()),
    }
    return await json_response(content, headers=timing_headers(request, outcome.timing, started, len(texts)))


def _encoded(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector


def model_card(request: Request, served: ServedModel) -> dict[str, Any]:
    """A served model: OpenAI's fields (id, object, created, owned_by), Infinity's (stats,
    backend, capabilities) and this server's kind, window, dimension and dtype."""
    runtime = runtime_of(request)
    settings = served.settings
    model = served.info
    controller = served.controller
    return {
        "id": served.name,
        "object": "model",
        "created": int(time.time() - served.metrics.uptime_s()),
        "owned_by": "reranker",
        "backend": model.backend if model else "",
        "capabilities": model.capabilities if model else [],
        "kind": model.kind.value if model else None,
        "device": model.device if model else None,
        "max_input_length": model.max_length if model else None,
        "dimension": model.dimension if model else None,
        "dtype": model.dtype if model else None,
        "source": settings.model_source,
        "limits": {
            "max_documents_per_request": settings.max_documents_per_request,
            "max_texts_per_embed_request": settings.max_texts_per_embed_request,
            "max_text_chars": settings.max_text_chars,
            "max_request_bytes": settings.max_request_bytes,
        },
        "stats": {
            "status": runtime.status.value,
            "queued": controller.queued if controller else 0,
            "in_flight": controller.in_flight if controller else 0,
            "batch_size": served.batch_size,
        },
    }


async def models(request: Request) -> Response:
    """``GET /models`` and ``GET /v1/models``: OpenAI's ``models.list()`` shape, every model."""
    cards = [model_card(request, served) for served in runtime_of(request).models]
    return ORJSONResponse({"object": "list", "data": cards})


async def infinity_models(request: Request) -> Response:
    """``GET /infinity/models``: the same, less ``owned_by`` (infinity-client only accepts its own name)."""
    cards = [model_card(request, served) for served in runtime_of(request).models]
    for card in cards:
        del card["owned_by"]
    return ORJSONResponse({"object": "list", "data": cards})
