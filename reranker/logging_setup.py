"""Logging for the server process: text or JSON lines (LOG_FORMAT), each with its request id.

Everything goes through one root handler, uvicorn's loggers included (the CLI gives
uvicorn ``log_config=None``), so its access and error lines share the format. A JSON
line carries ``ts``, ``level``, ``logger``, ``message``, ``request_id`` when one is
being served, and the structured fields a record brings (``extra=``).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

from reranker.request_context import current_request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# Fields a record may carry with ``extra=``; nothing else of a record reaches a JSON line.
STRUCTURED_FIELDS = (
    "endpoint", "method", "status", "items", "queue_ms", "inference_ms", "batch_size",
    "duration_ms", "client", "body",
)  # fmt: skip


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            line["request_id"] = request_id
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _, status = record.args  # uvicorn's access-log arguments
            line.update(client=client, method=method, endpoint=path, status=status)
        for name in STRUCTURED_FIELDS:
            if name in record.__dict__:
                line[name] = record.__dict__[name]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # Libraries' progress bars and load reports are noise in a server log.
    for noisy in ("transformers", "sentence_transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
