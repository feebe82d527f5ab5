"""What every front door shares: bounded body reading, call context from headers, the one
inference path with its metrics and response headers, and protocol-shaped error bodies."""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from duoserve.dataplane import CallContext, DataPlane, Served
from duoserve.errors import (
    BadRequest,
    DuoServeError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from duoserve.logs import REQUEST_ID
from duoserve.metrics import Metrics
from duoserve.routes import FAST_ENDPOINTS, SCOPE_KEY
from duoserve.tracing import TRACEPARENT, RequestTrace

if TYPE_CHECKING:
    from duoserve.routes import RouteTable
    from duoserve.tracing import Tracing

JSON = "application/json"
# TF Serving and TorchServe read any body as JSON; curl -d sends form-urlencoded. Their front
# doors accept what those servers' clients send, and refuse media that cannot be JSON.
LENIENT_JSON = (
    JSON,
    "application/x-www-form-urlencoded",
    "text/plain",
    "application/octet-stream",
)

Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])


def fast_path(endpoint: Endpoint) -> Endpoint:
    """Mark an inference endpoint ``async def (request, **path_params) -> Response`` for the
    gateway's own dispatch: FastAPI's router and dependency solving cost more than the rest of
    an inference request (measured: ~235 vs ~90 us in process). The route stays declared on
    FastAPI too, for the OpenAPI schema; its path parameters must all be plain strings.
    Front doors declare this on their routes instead (``FrontDoor.route(..., fast=True)``);
    this marks an endpoint of a plain APIRouter."""
    FAST_ENDPOINTS.add(endpoint)
    return endpoint


@dataclass(slots=True)
class Gateway:
    """The objects a front door needs, built once by create_app."""

    dataplane: DataPlane
    metrics: Metrics
    max_body_bytes: int
    routes: RouteTable
    """What each route is; a request's match gives its front door's error shape."""
    tracing: Tracing | None = None
    """Traces and the log lines' request ids (duoserve.tracing); None when both are off."""


def gateway_of(request: Request) -> Gateway:
    # Read straight off the app's State (a plain attribute lookup of State costs a __getattr__
    # call and a dict lookup): this runs on every request.
    gateway: Gateway = request.scope["app"].state._state["gateway"]
    return gateway


class RawResponse(Response):
    """A Response whose headers come ready as ASGI's (name, value) byte pairs, names lower
    case, content-length included: the inference path builds them once instead of Starlette
    re-encoding and re-scanning a dict."""

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]):
        self.status_code = status_code
        self.background = None
        self.body = body
        self.raw_headers = raw_headers


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def json_response(
    content: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type=JSON)


def error_json(error: DuoServeError) -> bytes:
    """The V2 and TF Serving error body."""
    return orjson.dumps({"error": error.message})


def torchserve_error_json(error: DuoServeError) -> bytes:
    """TorchServe's error body shape."""
    return orjson.dumps(
        {"code": error.status, "type": type(error).__name__, "message": error.message}
    )


def headers_of(request: Request) -> dict[str, str]:
    """The request's headers as one plain dict (ASGI servers lowercase the names), built once
    per request: cheaper than Starlette's Headers, which scans the list on every lookup."""
    return {
        name.decode("latin-1"): value.decode("latin-1") for name, value in request.scope["headers"]
    }


def check_content_type(headers: Mapping[str, str], accepted: tuple[str, ...]) -> None:
    """415 unless the body's media type is one the front door reads (absent means JSON)."""
    raw = headers.get("content-type")
    if not raw:
        return
    media = raw.split(";", 1)[0].strip().lower()
    if media not in accepted:
        raise UnsupportedMediaType(
            f"content type '{media[:64]}' is not accepted here; send {' or '.join(accepted)}"
        )


async def read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The request body, at most ``limit`` bytes after decompression (413 beyond).

    Enforced for Content-Length and chunked bodies alike, and for gzip/deflate bodies after
    inflating, so a small compressed bomb cannot become a huge buffer. A client that leaves
    while sending raises ClientDisconnect.
    """
    declared = headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest("Content-Length must be a whole number of bytes")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"content encoding '{encoding[:32]}' is not supported; use gzip")
    inflater = zlib.decompressobj(wbits=47)  # gzip or zlib header, auto-detected
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequest(f"the body is not valid {encoding} data") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"request body over the {limit}-byte limit once decompressed")
    if not inflater.eof:
        raise BadRequest(f"the {encoding} body is truncated")
    return inflated


def call_context(headers: Mapping[str, str], protocol: str) -> CallContext:
    timeout = headers.get("x-duoserve-timeout-ms")
    timeout_ms: float | None = None
    if timeout is not None:
        try:
            timeout_ms = float(timeout)
        except ValueError:
            raise BadRequest("x-duoserve-timeout-ms must be a number of milliseconds") from None
        if not timeout_ms > 0 or timeout_ms != timeout_ms:
            raise BadRequest("x-duoserve-timeout-ms must be a positive number of milliseconds")
    route_key = headers.get("x-duoserve-route-key")
    return CallContext(
        protocol=protocol,
        pin=headers.get("x-duoserve-framework"),
        route_key=route_key[:256] if route_key else None,
        timeout_ms=timeout_ms,
    )


def request_id(headers: Mapping[str, str]) -> str:
    """The client's x-request-id when it is a sane token, else a new random one."""
    given = headers.get("x-request-id")
    if given and REQUEST_ID.match(given):
        return given
    return os.urandom(16).hex()


def start_trace(
    gateway: Gateway,
    scope: Scope,
    headers: Mapping[str, str],
    rid: str,
    protocol: str,
    model: str,
) -> RequestTrace | None:
    """The request's trace: its span when tracing is on, else the caller's trace context to
    pass on (None when it sent none)."""
    tracing = gateway.tracing
    if tracing is None:
        return RequestTrace.forwarding(headers) if TRACEPARENT in headers else None
    match = scope.get(SCOPE_KEY)
    route = match.route if match is not None else None
    return tracing.start(
        headers,
        rid,
        protocol=protocol,
        model=model,
        route=route.path if route is not None else "inference",
        path=scope["path"],
        scheme=scope.get("scheme", "http"),
    )


def unanswered(error: BaseException) -> int:
    """The status a trace records for a request that ended without an answer: the client
    left (499, as nginx logs it), or the gateway failed (500)."""
    return 499 if isinstance(error, ClientDisconnect | asyncio.CancelledError) else 500


async def serve_inference(
    request: Request,
    protocol: str,
    model_name: str,
    handle: Callable[
        [Gateway, bytes, CallContext, Mapping[str, str]],
        Awaitable[tuple[Served, bytes, dict[str, str]]],
    ],
    accepted_types: tuple[str, ...] = (JSON,),
) -> Response:
    """The one inference path of every front door.

    ``handle(gateway, body, context, headers)`` decodes the body, calls the data plane and
    encodes the answer; this wraps it with
    body limits, metrics, response headers and the error body its front door declared.
    """
    gateway = gateway_of(request)
    metrics = gateway.metrics
    started = time.perf_counter()
    headers_in = headers_of(request)
    rid = request_id(headers_in)
    trace = start_trace(gateway, request.scope, headers_in, rid, protocol, model_name)
    in_flight = metrics.in_flight.labels(protocol)
    in_flight.inc()
    framework = backend = "none"
    metric_model = model_name if model_name in gateway.dataplane.models else "unknown"
    failure: DuoServeError | None = None
    try:
        check_content_type(headers_in, accepted_types)
        body = await read_body(request.receive, headers_in, gateway.max_body_bytes)
        metrics.request_size.labels(protocol).observe(len(body))
        context = call_context(headers_in, protocol)
        context.trace = trace
        served, payload, extra_headers = await handle(gateway, body, context, headers_in)
    except DuoServeError as error:
        failure = error
        status = error.status
        if error.route is not None:
            framework, backend = error.route.framework, error.route.backend_name
        payload = gateway.routes.resolve(request.scope).info.errors(error)
        headers = {"x-request-id": rid, **error.headers}
        response = Response(payload, status_code=status, headers=headers, media_type=JSON)
    except BaseException as error:  # no answer: the client left, or a bug (Dispatch's 500)
        if trace is not None:
            trace.finish(unanswered(error), framework, backend, error)
        raise
    else:
        status = 200
        framework = served.route.framework
        backend = served.route.backend_name
        elapsed = time.perf_counter() - started
        timing = (
            f"gateway;dur={(elapsed - served.backend_s) * 1000:.3f}, "
            f"backend;dur={served.backend_s * 1000:.3f}"
        )
        response = RawResponse(
            payload,
            200,
            [
                (b"x-request-id", rid.encode("latin-1")),
                (b"x-duoserve-framework", framework.encode("latin-1")),
                (b"x-duoserve-backend", backend.encode("latin-1")),
                (b"server-timing", timing.encode("latin-1")),
                *_raw(extra_headers),
                (b"content-length", str(len(payload)).encode("latin-1")),
            ],
        )
        metrics.items.labels(metric_model, framework).inc(_rows(served))
    finally:
        in_flight.dec()
    metrics.response_size.labels(protocol).observe(len(payload))
    metrics.requests.labels(metric_model, framework, backend, protocol, str(status)).inc()
    duration = metrics.request_duration.labels(metric_model, framework, protocol)
    if trace is None:
        duration.observe(time.perf_counter() - started)
    else:
        trace.finish(status, framework, backend, failure)
        trace_id = trace.trace_id
        duration.observe(
            time.perf_counter() - started, None if trace_id is None else {"trace_id": trace_id}
        )
    return response


def _rows(served: Served) -> int:
    outputs = served.response.outputs
    if outputs and outputs[0].data.ndim:
        return int(outputs[0].data.shape[0])
    return 1
