"""Reading a request: size-limited body, JSON parsing, schema validation.

Each failure becomes a domain error with a message that names the limit or the
field, so the error table turns it into 413, 400 or 422.
"""

from __future__ import annotations

import asyncio
import difflib
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from reranker.errors import (
    BodyTimeoutError,
    ClientDisconnectedError,
    InvalidInputError,
    MalformedRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from reranker.settings import Settings

Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")
PARSE_IN_THREAD_BYTES = 1024 * 1024  # bigger bodies are parsed in a worker thread


def is_json_media_type(content_type: str) -> bool:
    """``application/json``, ``application/*+json`` (parameters such as ``charset`` allowed), or
    no Content-Type at all (curl without ``-H``, hand-written clients): all read as JSON."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type in ("", "application/json") or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def read_json(request: Request, max_bytes: int, timeout_s: float) -> Any:
    """The JSON body: at most ``max_bytes`` (MAX_REQUEST_BYTES), received within ``timeout_s``
    (BODY_READ_TIMEOUT_S), so a slow or half-sent body cannot hold the server forever."""
    content_type = request.headers.get("content-type", "")
    if not is_json_media_type(content_type):
        raise UnsupportedMediaTypeError(
            f"Content-Type {content_type!r} is not JSON: send the body as JSON with "
            "'Content-Type: application/json'"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body of {declared} bytes is over MAX_REQUEST_BYTES={max_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLargeError(f"request body is over MAX_REQUEST_BYTES={max_bytes}")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeoutError(
            f"the request body did not arrive within BODY_READ_TIMEOUT_S={timeout_s:g} s "
            f"({size} bytes received)"
        ) from None
    except ClientDisconnect:
        raise ClientDisconnectedError(
            f"the client disconnected while sending its body ({size} bytes received)"
        ) from None
    body = b"".join(chunks)
    if not body.strip():
        raise MalformedRequestError("request body is empty; expected a JSON object")
    try:
        if len(body) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(orjson.loads, body)
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequestError(f"request body is not valid JSON: {exc}") from None


async def read_body(request: Request, model: type[Model], settings: Settings) -> Model:
    """The request body, size- and time-limited, parsed and validated against ``model``."""
    return validate(model, await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s))


def validate(model: type[Model], data: Any) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation_error(exc)) from None


CLASS_NAME = re.compile(r" or instance of \w+")


def unknown_fields(model: type[BaseModel], data: Any) -> list[str]:
    """A warning per top-level field of ``data`` that ``model`` does not know, with the closest
    known name: this server's own shapes answer them (a typo such as ``topn`` is never silently
    dropped); the vendor dialects accept what their SDKs send without a word."""
    if not isinstance(data, dict):
        return []
    known = set(model.model_fields)
    notes = []
    for name in sorted(set(data) - known):
        close = difflib.get_close_matches(str(name), sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        notes.append(f"unknown field {name!r} ignored{hint}")
    return notes


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(part) for part in err["loc"])
        message = CLASS_NAME.sub("", err["msg"].removeprefix("Value error, "))  # no internal names
        if where or err["type"] != "value_error":  # whole-body checks name their own place
            message = f"{where or 'body'}: {message}"
        problems.append(message)
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (so it costs no more compute) if the client goes away.

    ``work`` runs in the request's own task; one watcher task waits for the disconnect and
    cancels it (a task for the work too, and ``asyncio.wait`` on both, cost twice as much per
    request on the hot path). A result ready in the same turn the disconnect is seen is dropped:
    nobody reads it. A cancellation from outside (the server stopping) stays a cancellation."""
    served = asyncio.current_task()
    assert served is not None, "called outside a task"
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        served.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        result = await work
    except asyncio.CancelledError:
        if not gone or served.uncancel() > 0:
            raise  # cancelled from outside as well: not ours to turn into a 499
        raise ClientDisconnectedError("the client disconnected before the response was ready") from None
    except BaseException:
        if not gone:
            raise
        served.uncancel()  # the work turned our cancellation into an error of its own
        raise ClientDisconnectedError("the client disconnected before the response was ready") from None
    finally:
        watcher.cancel()
    if gone:
        served.uncancel()  # the work finished anyway: the answer goes nowhere, the task carries on
    return result


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
