"""The one pipeline of every inference route: a dialect is a parse/render pair over a neutral call.

A request goes: its body read (size, time: body.py) -> its dialect chosen (fixed by the route, or
told by the body as TEI's on /rerank and /embed) -> the dialect's error shape spoken
(dialects.py) -> the body validated against the dialect's schema -> ``parse`` into a neutral call
(calls.py) -> the call's limits -> the model chosen (``model_of``: path, body, capability) ->
the call run on it, cancelled if the client goes -> ``render`` into the vendor's answer ->
JSON with the timing headers. Whatever is raised on the way is a ``RerankerError``, mapped to a
status once (errors.py); a text the engine found too long is named by the call's own labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_json, unknown_fields, unless_disconnected, validate
from reranker.api.calls import Call, Outcome
from reranker.api.dialects import speak
from reranker.api.observe import Handler, model_of, runtime_of, timing_headers
from reranker.api.responses import json_response
from reranker.engine.model import ServedModel
from reranker.engine.service import TextTooLongError
from reranker.errors import InvalidInputError
from reranker.settings import Settings

B = TypeVar("B", bound=BaseModel)
C = TypeVar("C", bound=Call)
R = TypeVar("R", bound=Outcome)


@dataclass(frozen=True, slots=True)
class Rendering(Generic[B, C, R]):
    """What a dialect's ``render`` shapes its answer from."""

    body: B
    call: C
    result: R
    model: ServedModel
    started: float  # time.perf_counter() when the request arrived
    notes: list[str]  # warnings about the body (unknown fields)


@dataclass(frozen=True, slots=True)
class Dialect(Generic[B, C, R]):
    """One route's vendor shapes: the body it takes, how it becomes a call, how the outcome is answered."""

    schema: type[B]
    capability: str | tuple[str, ...]  # what the model must be able to do (model_of)
    parse: Callable[[B, Settings], C]
    render: Callable[[Rendering[B, C, R]], Any]
    speaks: str | None = None  # the error shape (dialects.TEI); None: this server's own
    warns: bool = False  # a warning per unknown field in the answer (this server's own shapes)


Chooser = Callable[[Request, Any], "tuple[Dialect[Any, Any, Any], Any]"]


def handler(dialect: Dialect[Any, Any, Any]) -> Handler:
    """The route that speaks ``dialect`` only."""

    async def handle(request: Request) -> Response:
        started = time.perf_counter()
        if dialect.speaks is not None:
            speak(request, dialect.speaks)  # a body that cannot be read is answered in its shape too
        return await serve(request, dialect, await _read(request), started)

    return handle


def choosing(choose: Chooser, speaks: str | None = None) -> Handler:
    """A route whose body (or model) says which dialect it speaks: ``choose(request, data)``
    answers the dialect and the data to validate. ``speaks``: the route's error shape until then."""

    async def handle(request: Request) -> Response:
        started = time.perf_counter()
        if speaks is not None:
            speak(request, speaks)
        dialect, data = choose(request, await _read(request))
        return await serve(request, dialect, data, started)

    return handle


async def serve(request: Request, dialect: Dialect[Any, Any, Any], data: Any, started: float) -> Response:
    if dialect.speaks is not None:
        speak(request, dialect.speaks)
    settings = runtime_of(request).settings
    body = validate(dialect.schema, data)
    notes = unknown_fields(dialect.schema, data) if dialect.warns else []
    call = dialect.parse(body, settings)
    call.check(settings)
    model = model_of(request, getattr(body, "model", None), dialect.capability)
    model.require_service()  # loading or failed: 503 before any work
    try:
        result = await unless_disconnected(request, call.run(model, settings))
    except TextTooLongError as exc:
        raise InvalidInputError(call.too_long(exc.position, exc.max_tokens)) from None
    content = dialect.render(Rendering(body, call, result, model, started, notes))
    headers = timing_headers(request, result.timing, started, call.items)
    return await json_response(content, headers=headers)


async def _read(request: Request) -> Any:
    settings = runtime_of(request).settings
    return await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s)
