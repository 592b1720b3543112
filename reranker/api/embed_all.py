"""TEI's ``POST /embed_all``: per input, one vector per token the model saw (special and prompt
tokens included, padding left out), before pooling or normalisation: the building block of
late-interaction retrieval. ``[n_inputs][n_tokens_i][hidden]``."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_json, unless_disconnected, validate
from reranker.api.dialects import TEI, speak
from reranker.api.observe import model_of, runtime_of, timing_headers
from reranker.api.responses import json_response
from reranker.api.schemas import check_embed_limits
from reranker.api.sparse import TeiSparseRequest
from reranker.api.tei import long_refused
from reranker.api.text_limits import fit_texts


async def embed_all(request: Request) -> Response:
    started = time.perf_counter()
    speak(request, TEI)
    runtime = runtime_of(request)
    settings = runtime.settings
    body = validate(
        TeiSparseRequest, await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s)
    )
    texts = body.texts()
    check_embed_limits(settings, texts)
    service = model_of(request, None, "embed_tokens").require_service()
    labels = [f"inputs.{i}" for i in range(len(texts))]
    texts = fit_texts(settings, texts, labels, service.max_tokens if body.truncate else None, "")
    prompt = service.embed_prompt(body.prompt_name, None)
    work = unless_disconnected(request, service.embed_tokens(texts, body.truncate, prompt))
    vectors, _, timing = await long_refused(work, "inputs", service.max_tokens)
    return await json_response(
        [list(states) for states in vectors], headers=timing_headers(request, timing, started, len(texts))
    )
