"""How the gateway logs: plain text (the default) or one JSON object per line
(``DUOSERVE_LOG_FORMAT=json``), each line carrying the ids of the request that caused it; and
the optional access log in the same format.

A request's ids reach every line logged while it is served through a context variable
(``CURRENT``): set by the inference path when JSON lines or the JSON access log want them,
never otherwise, so text logs cost nothing per request. The JSON lines hold what was logged and
the request's ids, never a header, key, token or payload: nothing logs those.
"""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send


@dataclass(slots=True)
class LogContext:
    """What a log line says about the request it was logged for."""

    request_id: str | None = None
    model: str | None = None
    framework: str | None = None
    backend: str | None = None
    trace_id: str | None = None
    span_id: str | None = None

    def fields(self) -> dict[str, str]:
        return {name: value for name in _FIELDS if (value := getattr(self, name)) is not None}


REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
"""What an ``x-request-id`` from a client must look like to be kept (else a new one is made)."""

_FIELDS = ("request_id", "trace_id", "span_id", "model", "framework", "backend")

CURRENT: ContextVar[LogContext | None] = ContextVar("duoserve_log_context", default=None)
"""The request being served by the code running now (None outside requests, or when nothing
asked for request ids in the logs)."""

# Attributes every LogRecord has; anything else was passed with ``extra=`` (the access log's).
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "color_message"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the ids of the
    request being served (request_id, trace_id, span_id, model, framework, backend) when there
    is one, an ``exception`` with its traceback when one was logged, and what the access log
    adds (method, path, status, duration_ms, client)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = CURRENT.get()
        if context is not None:
            entry.update(context.fields())
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


def logging_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` writing JSON lines for the whole process (root,
    uvicorn, the gateway); the text format is uvicorn's own and needs none."""
    level = level.upper()
    formatter: dict[str, Any] = {"()": f"{__name__}.JSONFormatter"}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    quiet = {"handlers": ["default"], "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": quiet,
            "uvicorn.error": {"level": level},
            "uvicorn.access": quiet,
        },
    }


ACCESS_LOG = logging.getLogger("duoserve.access")


class AccessLog:
    """One line per HTTP request, after its answer went out: method, path (never the query
    string), status, duration in milliseconds, client address, and the request's ids (which
    the inference path fills in). The JSON format's access log; the text format keeps
    uvicorn's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        context = LogContext()
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"x-request-id")
        if given is not None and REQUEST_ID.match(given.decode("latin-1")):
            context.request_id = given.decode("latin-1")
        token = CURRENT.set(context)
        status = 0

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            ACCESS_LOG.info(
                "%s %s %d",
                scope.get("method", ""),
                scope.get("path", "")[:200],
                status,
                extra={
                    "method": scope.get("method", ""),
                    "path": scope.get("path", "")[:200],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                },
            )
            CURRENT.reset(token)
