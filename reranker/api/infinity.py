"""Infinity's dialect under ``/infinity`` (infinity-client's ``base_url`` is
``http://HOST:PORT/infinity``), and the model list at ``GET /models`` and ``GET /v1/models``.

Infinity's routes have no ``/v1``; its ``/rerank`` takes ``{"query", "documents"}`` as this
server's own ``/rerank`` does, but answers in a Cohere-like shape, so it lives under a prefix
instead of being guessed from the body.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.calls import EmbedCall, Embedded, RerankCall, Reranked
from reranker.api.embed import encoded, parse_openai
from reranker.api.observe import runtime_of
from reranker.api.pipeline import Dialect, Rendering, handler
from reranker.api.rerank import parse_native
from reranker.api.responses import ORJSONResponse
from reranker.api.schemas import OpenAIEmbeddingRequest, RerankRequest
from reranker.engine.model import ServedModel
from reranker.engine.rerank_results import ranked, scores_of

PREFIX = "/infinity"


class InfinityRerankRequest(RerankRequest):
    raw_scores: bool = Field(False, description="The raw logit instead of its sigmoid (cross-encoders).")


class InfinityEmbeddingRequest(OpenAIEmbeddingRequest):
    dimensions: int | None = Field(None, ge=0, description="0 or absent: the model's dimension.")
    modality: Literal["text"] = "text"
    user: str | None = None


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _stamp() -> dict[str, Any]:
    return {"id": f"infinity-{uuid.uuid4()}", "created": int(time.time())}


def render_rerank(r: Rendering[InfinityRerankRequest, RerankCall, Reranked]) -> dict[str, Any]:
    outcome, call = r.result.outcome, r.call
    scores = scores_of(outcome, call.raw_scores)
    results: list[dict[str, Any]] = []
    for index in ranked(outcome, call.top_n):
        result: dict[str, Any] = {"relevance_score": float(scores[index]), "index": index}
        if call.return_documents:
            result["document"] = r.body.documents[index]
        results.append(result)
    content = {"object": "rerank", "results": results, "model": r.model.name, "usage": _usage(outcome.tokens)}
    return content | _stamp()


def render_embeddings(r: Rendering[InfinityEmbeddingRequest, EmbedCall, Embedded]) -> dict[str, Any]:
    data = [
        {"object": "embedding", "embedding": encoded(vector, r.body.encoding_format), "index": index}
        for index, vector in enumerate(r.result.vectors)
    ]
    usage = _usage(r.result.outcome.tokens)
    return {"object": "list", "data": data, "model": r.model.name, "usage": usage} | _stamp()


# Infinity's bodies are ours and OpenAI's, with a few more fields: their parses are those routes'.
RERANK = Dialect(InfinityRerankRequest, "rerank", parse_native, render_rerank)
EMBEDDINGS = Dialect(InfinityEmbeddingRequest, "embed", parse_openai, render_embeddings)
rerank = handler(RERANK)
embeddings = handler(EMBEDDINGS)


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
