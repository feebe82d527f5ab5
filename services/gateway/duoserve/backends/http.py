"""The REST backends' calls over the pooled HTTP client (httpclient.py), and the one table
that turns a backend's HTTP status into the gateway's error."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from duoserve.backends.endpoints import EndpointSet, Resolver, endpoint_names, resolve_host
from duoserve.backends.httpclient import (
    ConnectError,
    ConnectionLostError,
    HTTPPool,
    PoolClosedError,
    ProtocolError,
    Reply,
    ReplyCutShortError,
)
from duoserve.config import RemoteBackendConfig
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
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tracing import TraceCarrier

__all__ = [
    "PROBE_TIMEOUT_S",
    "HTTPPool",
    "Reply",
    "call",
    "http_endpoints",
    "server_message",
    "status_error",
]

# Readiness and metadata calls: short, whatever the backend's inference timeout.
PROBE_TIMEOUT_S = 2.0


async def call(
    pool: HTTPPool,
    method: str,
    target: str,
    *,
    what: str,
    deadline: Deadline,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    trace: TraceCarrier | None = None,
) -> Reply:
    """One call below the pool's base URL that must finish before ``deadline``.

    Refused connections and connections the server closed before any byte of an answer are
    Unavailable (the backend did not complete the call, so it may be retried or failed over); a
    connection lost after the answer began is UpstreamError (the backend ran the call: not
    retried); a call past the deadline is UpstreamTimeout. Messages name the backend kind,
    never its address. ``trace``: the call's trace context, sent as headers; the replica, target
    and status are noted there for its span.
    """
    timeout_s = deadline.check(f"the {what} call")
    if trace is not None:
        trace.peer = pool.connect_to
        trace.target = target
        if trace.headers:
            headers = {**headers, **trace.headers} if headers else trace.headers
    try:
        reply = await pool.request(method, target, body=body, headers=headers, timeout_s=timeout_s)
        if trace is not None:
            trace.status = reply.status
        return reply
    except TimeoutError:
        raise UpstreamTimeout(
            f"the {what} backend did not answer within the deadline "
            f"({deadline.budget_s * 1000:.0f} ms)"
        ) from None
    except (ConnectError, ConnectionLostError) as error:
        raise Unavailable(f"the {what} backend is not reachable", reason="backend_down") from error
    except ReplyCutShortError as error:
        raise UpstreamError(
            f"the {what} backend's connection broke in the middle of its answer"
        ) from error
    except PoolClosedError as error:
        raise Unavailable(f"the {what} backend is shut down", reason="closed") from error
    except ProtocolError as error:
        raise UpstreamError(f"the {what} backend's answer was unreadable ({error})") from error
    except ValueError as error:  # a header that cannot be sent (line break, not latin-1)
        raise UpstreamError(
            f"the gateway cannot send this {what} call: a configured header or token is invalid"
        ) from error


def status_error(status: int, server: str, what: str, detail: str = "") -> DuoServeError:
    """The gateway's error for a backend's non-200 answer, the table every REST backend shares:
    400/422 the client's input (422: a FastAPI server's validation, e.g. MLServer's), 404
    unknown model or version, 413 too large, 429/503 at capacity (not processed: retryable),
    408/504 timeout, anything else the backend's own failure. ``detail`` is the backend's
    sanitised message (``server_message``); backends handle their quirks first."""
    if status in (400, 422):
        return BadRequest(detail or f"{server} rejected the input of {what}")
    if status == 404:
        suffix = f": {detail}" if detail else ""
        return NotFound(f"{what} is not available on the {server} backend{suffix}")
    if status == 413:
        return PayloadTooLarge(f"the request is larger than {server} accepts")
    if status in (429, 503):
        return Overloaded(f"{server} is at capacity for {what}; retry shortly")
    if status in (408, 504):
        return UpstreamTimeout(f"{server} timed out running {what}")
    return UpstreamError(f"{server} failed running {what} (HTTP {status})")


# What a server's error text may carry that a client must never see: URLs, addresses (IPv4,
# [IPv6], host:port) and absolute paths (a model store, a worker's temp folder).
_URL = re.compile(r"\b[A-Za-z][\w+.-]*://\S+")
_ADDRESS = re.compile(
    r"\[[0-9A-Fa-f:.]+\](?::\d+)?"  # [IPv6]:port
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # IPv4[:port]
    r"|\b(?=[\w.-]*[A-Za-z])[\w-]+(?:\.[\w-]+)*:\d{2,5}\b"  # host:port (not a time, 12:30)
)
_PATH = re.compile(r"(?<![\w.~])/(?:[\w.@+-]+/)+[\w.@+-]*")
# Who raised it, as MLServer prefixes it ("mlserver.errors.InferenceError: ...",
# "builtins.ValueError: ..."), and Triton's "[request id: <id_unknown>] ": server internals.
_RAISER = re.compile(r"^(?:\[request id: [^\]]*\]\s*|(?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*: )+")


def server_message(text: str, limit: int = 300) -> str:
    """A backend's error text made fit for a client: its first line, without the name of the
    exception that carried it, with URLs, addresses and absolute paths blanked, at most
    ``limit`` characters."""
    lines = text.strip().splitlines()
    first = _RAISER.sub("", lines[0].strip()) if lines else ""
    first = _URL.sub("<url>", first)
    first = _ADDRESS.sub("<address>", first)
    first = _PATH.sub("<path>", first)
    return first[:limit]


def http_endpoints(
    backend: str,
    url: str,
    config: RemoteBackendConfig,
    *,
    what: str,
    probe: Callable[[HTTPPool], Awaitable[bool]],
    metrics: Metrics | None = None,
    resolver: Resolver = resolve_host,
) -> EndpointSet[HTTPPool]:
    """The replicas of an HTTP backend at ``url`` (or its ``endpoints``), a connection pool each.
    Every pool keeps the URL's scheme, path prefix and Host header."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    default = (parts.hostname, port) if parts.hostname else None
    return EndpointSet(
        backend,
        endpoint_names(config.endpoints, default),
        connect=lambda host, port: HTTPPool(url, config.max_concurrency, address=(host, port)),
        disconnect=HTTPPool.close,
        probe=probe,
        what=what,
        metrics=metrics,
        resolve_interval_s=config.resolve_interval_s,
        slow_start_s=config.slow_start_s,
        outlier=config.outlier,
        resolver=resolver,
    )
