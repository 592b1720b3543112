"""orjson responses (numpy-aware), rendered off the event loop when big, and the stable error body.

orjson holds the GIL for the whole of one ``dumps`` call, so a 10,000-vector body rendered
in one call stalls every other request for half a second even from a worker thread. A big
body is rendered in a worker thread in pieces of ``PIECE_ITEMS`` list items: between
pieces the interpreter hands the GIL back to the event loop, which keeps serving.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.responses import JSONResponse, Response

ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
PIECE_ITEMS = 256  # list items rendered per orjson call in a big body
BIG_LIST = 1024  # a list this long makes the body big


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=ORJSON_OPTIONS)


def error_body(error_type: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": error_type, "message": message}}


async def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response; a body holding a long list is rendered in a worker thread, in pieces."""
    if not _has_big_list(content):
        return ORJSONResponse(content, status_code=status_code, headers=headers)
    body = await asyncio.to_thread(render_in_pieces, content)
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def render_in_pieces(content: Any) -> bytes:
    """The same bytes as ``orjson.dumps(content)``, made by many short calls."""
    parts: list[bytes] = []
    _render(content, parts)
    return b"".join(parts)


def _render(value: Any, parts: list[bytes]) -> None:
    if isinstance(value, dict) and _has_big_list(value):
        parts.append(b"{")
        for position, (key, item) in enumerate(value.items()):
            parts.append(b"," if position else b"")
            parts.append(orjson.dumps(key if isinstance(key, str) else str(key)) + b":")
            _render(item, parts)
        parts.append(b"}")
    elif isinstance(value, list) and len(value) > PIECE_ITEMS:
        parts.append(b"[")
        for start in range(0, len(value), PIECE_ITEMS):
            parts.append(b"," if start else b"")
            parts.append(orjson.dumps(value[start : start + PIECE_ITEMS], option=ORJSON_OPTIONS)[1:-1])
        parts.append(b"]")
    else:
        parts.append(orjson.dumps(value, option=ORJSON_OPTIONS))


def _has_big_list(value: Any, depth: int = 0) -> bool:
    if isinstance(value, list):
        return len(value) >= BIG_LIST
    if isinstance(value, dict) and depth < 3:
        return any(_has_big_list(item, depth + 1) for item in value.values())
    return False
