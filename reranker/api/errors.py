"""The one table from error kind to HTTP status, and the handlers that apply it."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.dialects import error_content
from reranker.api.responses import ORJSONResponse, error_body
from reranker.errors import (
    BackendError,
    BodyTimeoutError,
    ClientDisconnectedError,
    InvalidInputError,
    JobStoreError,
    MalformedRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    RerankerError,
    TooManyJobsError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    UnsupportedOperationError,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[RerankerError], int] = {
    MalformedRequestError: 400,
    UnsupportedOperationError: 400,
    UnauthorizedError: 401,
    NotFoundError: 404,
    BodyTimeoutError: 408,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidInputError: 422,
    TooManyJobsError: 429,
    BackendError: 500,
    OverloadedError: 503,
    NotReadyError: 503,
    JobStoreError: 503,
    RequestTimeoutError: 504,
    ClientDisconnectedError: 499,  # nginx's code: nobody reads this response
}

HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


def status_for(error: RerankerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_response(error: RerankerError, request: Request | None = None) -> ORJSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, UnauthorizedError) else {}
    if isinstance(error, PayloadTooLargeError):
        headers["Connection"] = "close"  # its body may be unread: the connection cannot be reused
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    content = (
        error_content(request, error.error_type, error.message)
        if request is not None
        else error_body(error.error_type, error.message)
    )
    extra = getattr(error, "details", None)  # e.g. OpenAI's "code" and "param" for an unknown model
    if extra and isinstance(content.get("error"), dict):
        content["error"].update(extra)
    return ORJSONResponse(content, status_code=status_for(error), headers=headers)


async def handle_reranker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RerankerError)
    return error_response(exc, request)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error_type = HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    content = error_content(request, error_type, message)
    return ORJSONResponse(content, status_code=exc.status_code, headers=exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return ORJSONResponse(error_content(request, "internal_error", "internal server error"), status_code=500)


EXCEPTION_HANDLERS = {
    RerankerError: handle_reranker_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
