"""Domain errors raised below the HTTP layer.

Each error carries a stable ``error_type``; ``reranker.api.errors`` maps those
types to HTTP statuses in one table. Nothing here knows about HTTP.
"""

from __future__ import annotations


class RerankerError(Exception):
    """Base class: ``error_type`` is the stable machine-readable kind."""

    error_type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StartupError(RerankerError):
    """Configuration or environment that prevents the server from starting."""

    error_type = "startup_error"


class JobStoreStartupError(StartupError):
    """The job store cannot be used (JOB_STORE_DIR locked by another process, Redis unreachable):
    the process exits 2 instead of serving."""


class InvalidInputError(RerankerError):
    """The request is well-formed JSON but violates the schema or a limit."""

    error_type = "invalid_request"


class MalformedRequestError(RerankerError):
    """The request body is not parseable JSON."""

    error_type = "malformed_request"


class UnsupportedMediaTypeError(RerankerError):
    """The request body is declared as something other than JSON (Content-Type)."""

    error_type = "unsupported_media_type"


class PayloadTooLargeError(RerankerError):
    """The request body, or its number of items, is over a configured limit."""

    error_type = "payload_too_large"


class UnauthorizedError(RerankerError):
    """API keys are configured and the request carries none or a wrong one."""

    error_type = "unauthorized"


class BodyTimeoutError(RerankerError):
    """The client did not finish sending its body within BODY_READ_TIMEOUT_S."""

    error_type = "body_timeout"


class NotFoundError(RerankerError):
    """The thing asked for (a job) does not exist, or no longer."""

    error_type = "not_found"


class RetryLaterError(RerankerError):
    """Refused for now; ``retry_after_s`` becomes the Retry-After header."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyJobsError(RetryLaterError):
    """MAX_ACTIVE_JOBS jobs are queued or running; the caller should retry later."""

    error_type = "too_many_jobs"


class UnsupportedOperationError(RerankerError):
    """The loaded model cannot do what was asked (e.g. embed with a cross-encoder)."""

    error_type = "unsupported_operation"


class OverloadedError(RetryLaterError):
    """The admission queue is full; the caller should retry later."""

    error_type = "overloaded"


class NotReadyError(RetryLaterError):
    """The model is still loading, failed to load, or the server is draining."""

    error_type = "not_ready"


class JobStoreError(RetryLaterError):
    """The job store failed (disk full, Redis unreachable): a submission is refused, not lost."""

    error_type = "job_store_unavailable"


class RequestTimeoutError(RerankerError):
    """The request did not finish within REQUEST_TIMEOUT_S."""

    error_type = "timeout"


class BackendError(RerankerError):
    """The model backend failed while running a batch."""

    error_type = "backend_error"


class ClientDisconnectedError(RerankerError):
    """The client went away before its answer was ready; the work was dropped."""

    error_type = "client_disconnected"
