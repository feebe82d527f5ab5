"""One exception hierarchy; every error carries the HTTP status the client gets.

Messages say what was wrong and how to fix it. They never carry stack traces, tokens,
internal addresses or backend internals: backends raise these with sanitised text.
"""

from __future__ import annotations

from typing import Any


class DuoServeError(Exception):
    """Base of every error the gateway answers with; ``status`` is the HTTP status."""

    status: int = 500
    reason: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.route: Any = None
        """The route that failed, when a backend call did (set by the data plane)."""
        self.endpoint: str | None = None
        """The replica (``host:port``) whose call failed, for backends with several."""


class BadRequest(DuoServeError):
    status = 400
    reason = "bad_request"


class Unauthorized(DuoServeError):
    status = 401
    reason = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"www-authenticate": "Bearer"})


class Forbidden(DuoServeError):
    status = 403
    reason = "forbidden"


class NotFound(DuoServeError):
    status = 404
    reason = "not_found"


class RequestTimeout(DuoServeError):
    """The client did not send its request's head or body in time."""

    status = 408
    reason = "client_timeout"


class PayloadTooLarge(DuoServeError):
    status = 413
    reason = "payload_too_large"


class UnsupportedMediaType(DuoServeError):
    status = 415
    reason = "unsupported_media_type"


class TooManyRequests(DuoServeError):
    status = 429
    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, headers={"retry-after": str(max(1, round(retry_after_s)))})


class HeadersTooLarge(DuoServeError):
    status = 431
    reason = "headers_too_large"


class UpstreamError(DuoServeError):
    """The backend answered with a failure of its own (5xx, garbage)."""

    status = 502
    reason = "backend_error"


class Unavailable(DuoServeError):
    """Nothing can serve this now: backend down, circuit open, draining."""

    status = 503
    reason = "unavailable"

    def __init__(self, message: str, *, reason: str | None = None, retry_after_s: float = 1.0):
        super().__init__(message, headers={"retry-after": str(max(1, round(retry_after_s)))})
        if reason:
            self.reason = reason


class Overloaded(Unavailable):
    """Shed before doing any work: a concurrency limit and its queue are full."""

    reason = "overloaded"


class UpstreamTimeout(DuoServeError):
    status = 504
    reason = "timeout"
