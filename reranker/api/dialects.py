"""Which API dialect a request speaks, for the shape of its errors.

This server's own routes answer errors as ``{"error": {"type", "message"}}``. A request in
Hugging Face text-embeddings-inference's dialect (``reranker/api/tei.py``) gets TEI's shape,
``{"error": "...", "error_type": "..."}``, which TEI clients parse.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

TEI = "tei"
# Our error types -> TEI's ErrorType names (Validation, Tokenizer, Backend, Overloaded, Unhealthy, Empty).
TEI_ERROR_TYPES = {
    "invalid_request": "Validation",
    "payload_too_large": "Validation",
    "malformed_request": "Validation",
    "unsupported_operation": "Validation",
    "overloaded": "Overloaded",
    "not_ready": "Unhealthy",
    "backend_error": "Backend",
}


def speak(request: Request, dialect: str) -> None:
    """Mark the request as one in ``dialect``: its errors take that dialect's shape."""
    request.state.dialect = dialect


def error_content(request: Request, error_type: str, message: str) -> dict[str, Any]:
    if getattr(request.state, "dialect", None) == TEI:
        return {"error": message, "error_type": TEI_ERROR_TYPES.get(error_type, "Backend")}
    return {"error": {"type": error_type, "message": message}}
