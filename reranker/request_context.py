"""The id of the request being served, for every log line written while serving it.

Set by the HTTP layer's request middleware; read by the log formatter. A context
variable follows the request's task, including uvicorn's access-log call.
"""

from __future__ import annotations

from contextvars import ContextVar

current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)
