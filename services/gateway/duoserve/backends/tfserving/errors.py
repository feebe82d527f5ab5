"""TF Serving's failures as the gateway's errors, for both of its APIs side by side (a gRPC
status and an HTTP status that mean the same end the same), and its error text made safe to
show a client."""

from __future__ import annotations

import json
import logging
import re

import grpc

from duoserve.backends.http import status_error
from duoserve.errors import (
    BadRequest,
    DuoServeError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from duoserve.resilience import Deadline

log = logging.getLogger("duoserve.backends.tfserving")

_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?")
_ADDRESSES = re.compile(
    r"\b(?:ipv[46]:)?(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|localhost)(?::\d+)?\b"
)


def clean_message(text: str, limit: int = 400) -> str:
    """TF Serving's error text without graph internals, file paths or network addresses."""
    text = text.strip()
    # TensorFlow appends the failing node and its stack after the first line.
    text = text.split("\n\t [[", 1)[0].split("\n", 1)[0]
    text = _PATHS.sub("<path>", text)
    text = _ADDRESSES.sub("<address>", text)
    return text[:limit]


def describe(model: str, version: str | None) -> str:
    """A model (and version) as error messages name it."""
    return f"model '{model}'" + (f" version '{version}'" if version else "")


def grpc_error(
    backend: str, error: grpc.aio.AioRpcError, what: str, deadline: Deadline | None
) -> DuoServeError:
    """A failed gRPC call of backend ``backend`` about ``what``."""
    code = error.code()
    detail = clean_message(error.details() or "")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest(detail or f"TF Serving rejected the input of {what}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(
            f"{what} is not available on TF Serving backend '{backend}'"
            + (f": {detail}" if detail else "")
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(
            f"TF Serving backend '{backend}' is not reachable", reason="backend_down"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        budget = f" ({deadline.budget_s * 1000:.0f} ms)" if deadline else ""
        return UpstreamTimeout(f"TF Serving did not answer for {what} before the deadline{budget}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in (error.details() or ""):
            return PayloadTooLarge("the request is larger than the gRPC message size limit")
        return Overloaded(f"TF Serving is at capacity for {what}; retry shortly")
    log.warning("backend %s: TF Serving answered %s: %s", backend, code.name, detail)
    return UpstreamError(f"TF Serving failed running {what} ({code.name})")


def http_error(backend: str, status: int, raw: bytes, what: str) -> DuoServeError:
    """A REST answer of backend ``backend`` about ``what`` that is not a 200."""
    try:
        doc = json.loads(raw)
        detail = clean_message(str(doc.get("error", ""))) if isinstance(doc, dict) else ""
    except (ValueError, UnicodeDecodeError):
        detail = ""
    if status == 503:  # TF Serving's UNAVAILABLE: the server, not its queue
        return Unavailable(f"TF Serving backend '{backend}' is unavailable", reason="backend_down")
    if status not in (400, 404, 413, 429, 408, 504):
        log.warning("backend %s: TF Serving answered HTTP %s: %s", backend, status, detail)
    return status_error(status, "TF Serving", what, detail)
