"""API keys: API_KEYS (comma-separated) and/or API_KEYS_FILE (one key a line, # comments).

When any key is configured, the inference endpoints need ``Authorization: Bearer <key>``
(the header the Cohere and OpenAI SDKs send) and /metrics does too with
PROTECT_METRICS=true; /livez, /readyz and /health stay open for probes. Keys are kept
as SHA-256 digests and compared with ``hmac.compare_digest`` against every configured
key, so the time taken says nothing about how much of a key was right. Keys are never
logged: no header is.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.requests import Request

from reranker.errors import StartupError, UnauthorizedError
from reranker.settings import Settings


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(key) for key in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: str) -> bool:
        digest = _digest(presented)
        matched = False
        for known in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(digest, known)
        return matched


def load_api_keys(settings: Settings) -> ApiKeys | None:
    """The configured keys, or None when the server is open. A missing or empty file is an error."""
    keys: list[str] = []
    if settings.api_keys is not None:
        keys += [key.strip() for key in settings.api_keys.get_secret_value().split(",") if key.strip()]
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise StartupError(f"API_KEYS_FILE={path}: cannot read it ({exc.strerror})") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise StartupError(f"API_KEYS_FILE={path} holds no key")
        keys += from_file
    return ApiKeys(keys) if keys else None


def authorize(request: Request) -> None:
    """Raise UnauthorizedError unless keys are off or the request carries one of them."""
    keys: ApiKeys | None = request.app.state.api_keys
    if keys is None:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise UnauthorizedError("this server needs an API key: send the header Authorization: Bearer <key>")
    if not keys.accepts(presented.strip()):
        raise UnauthorizedError("the API key is not valid")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
