"""OpenTelemetry traces of inference requests, and the W3C trace context every backend call
carries.

Configured the way the ecosystem expects, by the standard ``OTEL_*`` variables, and off unless
an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``, or ``..._TRACES_ENDPOINT``): spans go
out over OTLP/HTTP (protobuf) with the official SDK's exporter, ``OTEL_SERVICE_NAME`` names the
service (``duoserve`` by default), ``OTEL_TRACES_SAMPLER`` / ``_ARG`` choose the sampler
(``parentbased_traceidratio`` with ``0.01``: one request in a hundred, and whatever a caller
sampled). The SDK is imported only then (the ``tracing`` extra).

Spans. The inference fast path bypasses ASGI middleware, so the spans come from the gateway's
own path: ``frontends.http.serve_inference`` starts the request's SERVER span (child of the
caller's ``traceparent``, if any) and ends it with the answer's status; the data plane starts a
span per backend call (``DataPlane._attempt``: one per attempt, so a retry and a failover are
spans of their own), and a span per shadow copy and per compare leg, whose backend calls are
its children. Each backend call sends the trace context of its own span: HTTP headers to
TorchServe, V2 servers and TF Serving REST, gRPC metadata to TF Serving.

Hot path. With tracing and JSON logs off, ``Gateway.tracing`` is None: a request costs one
attribute check, and one header lookup (a caller's ``traceparent`` is passed on unchanged, as
W3C trace context asks of every intermediary). A request that is not sampled gets no child
spans: its backends get its (unsampled) context, so they do not sample it either.

Export never holds a request: finished spans wait in a bounded queue (``OTEL_BSP_*``) that a
thread exports; a span that finds the queue full is dropped, and so is a batch the collector
did not take, each counted in ``duoserve_trace_spans_dropped_total{reason}``.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from duoserve.logs import CURRENT, LogContext

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from duoserve.metrics import Metrics
    from duoserve.router import Route

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Attribute names. Where OpenTelemetry's semantic conventions name a thing, theirs; the
# gateway's own notions under "duoserve.".
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS = "http.response.status_code"
HTTP_RESEND_COUNT = "http.request.resend_count"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
URL_FULL = "url.full"
URL_TEMPLATE = "url.template"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
PEER_ADDRESS = "network.peer.address"
PEER_PORT = "network.peer.port"
RPC_SYSTEM = "rpc.system.name"
RPC_METHOD = "rpc.method"
RPC_STATUS = "rpc.response.status_code"
ERROR_TYPE = "error.type"
REQUEST_ID = "http.response.header.x-request-id"
"""The request id, as the answer's ``x-request-id`` header carries it (sent or made)."""
FRONT_DOOR = "duoserve.front_door"
MODEL = "duoserve.model"
FRAMEWORK = "duoserve.framework"
BACKEND = "duoserve.backend"
BACKEND_MODEL = "duoserve.backend_model"
ATTEMPT = "duoserve.attempt"
CALL = "duoserve.call"
"""Why this backend call: ``first``, ``retry`` (the same route again after a call the backend
never processed) or ``failover`` (the next route after the previous one failed)."""
OUTCOME = "duoserve.outcome"
"""``ok``, or the error's reason (backend_down, timeout, overloaded, ...)."""
LEG = "duoserve.leg"
"""``shadow`` or ``compare``."""

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_MAX_TRACESTATE = 512


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something the gateway cannot do; says what to set."""


class CallSpan:
    """How a backend's calls appear in a trace: the span name, the attributes every call has,
    whether it leaves the process (CLIENT) and the URL its call targets are below (HTTP)."""

    __slots__ = ("name", "attributes", "remote", "url")

    def __init__(
        self,
        name: str = "infer",
        attributes: Mapping[str, str | int] | None = None,
        *,
        remote: bool = False,
        url: str | None = None,
    ) -> None:
        self.name = name
        self.attributes = dict(attributes or {})
        self.remote = remote
        self.url = url

    @classmethod
    def http(cls, url: str, template: str) -> CallSpan:
        """A POST to ``template`` (e.g. ``/predictions/{model}``) below ``url``."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        attributes: dict[str, str | int] = {HTTP_METHOD: "POST", URL_TEMPLATE: template}
        if parts.hostname:
            attributes |= {SERVER_ADDRESS: parts.hostname, SERVER_PORT: port}
        return cls(f"POST {template}", attributes, remote=True, url=url.rstrip("/"))

    @classmethod
    def grpc(cls, method: str, server: tuple[str, int] | None) -> CallSpan:
        """A unary gRPC call of ``method`` (``package.Service/Method``)."""
        attributes: dict[str, str | int] = {RPC_SYSTEM: "grpc", RPC_METHOD: method}
        if server is not None:
            attributes |= {SERVER_ADDRESS: server[0], SERVER_PORT: server[1]}
        return cls(method, attributes, remote=True)


class TraceCarrier:
    """One backend call's trace context (``headers``: sent as HTTP headers or gRPC metadata),
    and what the backend reports back for its span: the replica called (``peer``), the request
    target and the answer's status (HTTP status, or gRPC status name)."""

    __slots__ = ("headers", "peer", "target", "status", "span", "spec", "log_token")

    def __init__(
        self, headers: dict[str, str], span: Span | None = None, spec: CallSpan | None = None
    ) -> None:
        self.headers = headers
        self.peer: tuple[str, int] | None = None
        self.target: str | None = None
        self.status: int | str | None = None
        self.span = span
        self.spec = spec
        self.log_token: Any = None


def valid_traceparent(value: str) -> bool:
    """Whether ``value`` is a W3C ``traceparent`` this gateway may pass on: a known layout
    (version 00, or a later one with the same first fields), ids not all zeros."""
    match = _TRACEPARENT.match(value)
    if match is None:
        return False
    version, trace_id, parent_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return False
    return trace_id != "0" * 32 and parent_id != "0" * 16


def forwarded(headers: Mapping[str, str]) -> dict[str, str] | None:
    """A caller's trace context to pass on unchanged (tracing off), or None: none, or one that
    is not valid (W3C: then it is not propagated)."""
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None or not valid_traceparent(traceparent):
        return None
    out = {TRACEPARENT: traceparent}
    tracestate = headers.get(TRACESTATE)
    if tracestate and len(tracestate) <= _MAX_TRACESTATE:
        out[TRACESTATE] = tracestate
    return out


class RequestTrace:
    """One request's trace, handed down the data plane: the context its backend calls carry
    and, when the request is sampled, the span its calls' spans are children of (the request's,
    or a shadow or compare leg's). Also sets the log context of each backend call when JSON
    logs ask for it."""

    __slots__ = ("tracing", "span", "context", "carrier", "trace_id", "log", "log_token")

    def __init__(
        self,
        tracing: Tracing | None,
        span: Span | None,
        carrier: TraceCarrier | None,
        log: LogContext | None = None,
        log_token: Any = None,
    ) -> None:
        self.tracing = tracing
        self.span = span
        self.context: Context | None = None
        self.trace_id: str | None = None
        """The trace id (hex) when sampled: the exemplar of the latency histograms."""
        if span is not None:
            from opentelemetry.trace import set_span_in_context

            self.context = set_span_in_context(span)
            self.trace_id = f"{span.get_span_context().trace_id:032x}"
        self.carrier = carrier or TraceCarrier({})
        self.log = log
        self.log_token = log_token

    @classmethod
    def forwarding(cls, headers: Mapping[str, str]) -> RequestTrace | None:
        """Tracing off: the caller's trace context, passed on unchanged to every backend
        call; None when the caller sent none."""
        out = forwarded(headers)
        return None if out is None else cls(None, None, TraceCarrier(out))

    # -- backend calls --------------------------------------------------------------------

    def call(self, route: Route, attempt: int, failover: bool) -> TraceCarrier:
        """The trace context of one backend call (its own span when sampled). ``attempt``
        counts this route's calls for the request (1, then retries); ``failover``: the route
        is not the request's first."""
        log = self.log
        context = self.context
        if context is None:
            if log is None:
                return self.carrier  # passed on as it is, to every call
            carrier = TraceCarrier(self.carrier.headers)
            span_id = log.span_id
        else:
            tracing = self.tracing
            assert tracing is not None and tracing.tracer is not None
            from opentelemetry.trace import SpanKind

            spec: CallSpan = route.backend.call_span
            attributes: dict[str, str | int] = {
                **spec.attributes,
                BACKEND: route.backend_name,
                FRAMEWORK: route.framework,
                BACKEND_MODEL: route.model,
                ATTEMPT: attempt,
                CALL: "retry" if attempt > 1 else "failover" if failover else "first",
            }
            if attempt > 1 and spec.url is not None:
                attributes[HTTP_RESEND_COUNT] = attempt - 1
            span = tracing.tracer.start_span(
                spec.name,
                context=context,
                kind=SpanKind.CLIENT if spec.remote else SpanKind.INTERNAL,
                attributes=attributes,
            )
            carrier = TraceCarrier(tracing.inject(span), span, spec)
            span_id = f"{span.get_span_context().span_id:016x}"
        if log is not None:
            carrier.log_token = CURRENT.set(
                LogContext(
                    log.request_id,
                    log.model,
                    route.framework,
                    route.backend_name,
                    log.trace_id,
                    span_id,
                )
            )
        return carrier

    def called(self, carrier: TraceCarrier, error: BaseException | None) -> None:
        """The backend call of ``carrier`` ended (``error``: how it failed)."""
        span = carrier.span
        if span is not None:
            attributes: dict[str, str | int] = {}
            spec = carrier.spec
            if carrier.peer is not None:
                attributes[PEER_ADDRESS], attributes[PEER_PORT] = carrier.peer
                if spec is not None and SERVER_ADDRESS not in spec.attributes:
                    # Replicas listed one by one (no single address): the one called.
                    attributes[SERVER_ADDRESS], attributes[SERVER_PORT] = carrier.peer
            status = carrier.status
            if isinstance(status, int):
                attributes[HTTP_STATUS] = status
            elif status is not None:
                attributes[RPC_STATUS] = status
            if spec is not None and spec.url is not None and carrier.target is not None:
                attributes[URL_FULL] = spec.url + carrier.target
            _outcome(span, attributes, error)
            span.set_attributes(attributes)
            span.end()
        if carrier.log_token is not None:
            CURRENT.reset(carrier.log_token)

    # -- shadow and compare legs ----------------------------------------------------------

    def leg(self, kind: str, model: str, route: Route) -> RequestTrace:
        """A shadow copy or a compare leg on ``route``: a span of its own (when sampled),
        parent of its backend calls."""
        if self.context is None:
            return self
        tracing = self.tracing
        assert tracing is not None and tracing.tracer is not None
        span = tracing.tracer.start_span(
            f"duoserve {kind}",
            context=self.context,
            attributes={
                LEG: kind,
                MODEL: model,
                FRAMEWORK: route.framework,
                BACKEND: route.backend_name,
            },
        )
        return RequestTrace(tracing, span, None, self.log)

    def leg_done(
        self, error: BaseException | None, attributes: Mapping[str, Any] | None = None
    ) -> None:
        """A leg (``leg``) ended; ``attributes`` add what it found (a shadow's agreement)."""
        span = self.span
        if span is None:
            return
        values = {k: v for k, v in (attributes or {}).items() if v is not None}
        _outcome(span, values, error)
        span.set_attributes(values)
        span.end()

    # -- the request ----------------------------------------------------------------------

    def finish(
        self, status: int, framework: str, backend: str, error: BaseException | None
    ) -> None:
        """The request was answered with ``status``, served by ``framework`` on ``backend``
        ("none" when no backend served it)."""
        log = self.log
        if log is not None:
            if framework != "none":
                log.framework, log.backend = framework, backend
            if self.log_token is not None:
                CURRENT.reset(self.log_token)
                self.log_token = None
        span = self.span
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        attributes: dict[str, str | int] = {HTTP_STATUS: status}
        if framework != "none":
            attributes[FRAMEWORK] = framework
            attributes[BACKEND] = backend
        if status >= 500:
            reason = getattr(error, "reason", None) or str(status)
            attributes[ERROR_TYPE] = reason
            attributes[OUTCOME] = reason
            span.set_status(Status(StatusCode.ERROR, getattr(error, "message", None)))
        else:
            attributes[OUTCOME] = "ok" if status < 400 else getattr(error, "reason", str(status))
        span.set_attributes(attributes)
        span.end()


def _outcome(span: Span, attributes: dict[str, Any], error: BaseException | None) -> None:
    if error is None:
        attributes[OUTCOME] = "ok"
        return
    from opentelemetry.trace import Status, StatusCode

    reason = getattr(error, "reason", None) or type(error).__name__
    attributes[OUTCOME] = reason
    attributes[ERROR_TYPE] = reason
    span.set_status(Status(StatusCode.ERROR, getattr(error, "message", None)))


class Tracing:
    """What the gateway does per request for traces and for the log lines' request ids:
    ``tracer`` (None: no export, the caller's trace context is passed on unchanged) and
    ``logs`` (JSON lines or the JSON access log want each request's ids)."""

    def __init__(
        self,
        provider: TracerProvider | None,
        queue: SpanQueue | None,
        *,
        logs: bool,
    ) -> None:
        self.provider = provider
        self.queue = queue
        self.logs = logs
        self.tracer = None
        self._propagator: Any = None
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            from duoserve import __version__

            self.tracer = provider.get_tracer("duoserve", __version__)
            self._propagator = TraceContextTextMapPropagator()

    def start(
        self,
        headers: Mapping[str, str],
        request_id: str,
        *,
        protocol: str,
        model: str,
        route: str,
        path: str,
        scheme: str = "http",
    ) -> RequestTrace:
        """The trace of a request just received (its SERVER span when sampled)."""
        log: LogContext | None = None
        token = None
        if self.logs:
            log = CURRENT.get()  # the access log's, filled in for it
            if log is None:
                log = LogContext()
                token = CURRENT.set(log)
            log.request_id = request_id
            log.model = model
        tracer = self.tracer
        if tracer is None:
            out = forwarded(headers)
            if log is not None and out is not None:
                log.trace_id = out[TRACEPARENT][3:35]
                log.span_id = out[TRACEPARENT][36:52]
            return RequestTrace(self, None, TraceCarrier(out or {}), log, token)
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract(headers) if TRACEPARENT in headers else None
        span = tracer.start_span(f"POST {route}", context=parent, kind=SpanKind.SERVER)
        if log is not None:
            context = span.get_span_context()
            log.trace_id = f"{context.trace_id:032x}"
            log.span_id = f"{context.span_id:016x}"
        if not span.is_recording():
            # Not sampled: no spans below it; its context goes on, flagged unsampled.
            return RequestTrace(self, None, TraceCarrier(self.inject(span)), log, token)
        span.set_attributes(
            {
                HTTP_METHOD: "POST",
                HTTP_ROUTE: route,
                URL_PATH: path,
                URL_SCHEME: scheme,
                FRONT_DOOR: protocol,
                MODEL: model,
                REQUEST_ID: (request_id,),
            }
        )
        return RequestTrace(self, span, None, log, token)

    def inject(self, span: Span) -> dict[str, str]:
        """The W3C headers that make a callee's spans children of ``span``."""
        from opentelemetry.trace import set_span_in_context

        headers: dict[str, str] = {}
        self._propagator.inject(headers, context=set_span_in_context(span))
        return headers

    def start_export(self) -> None:
        if self.queue is not None:
            self.queue.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued, for at most ``timeout_s`` (a collector that is down does not
        hold the gateway's shutdown longer)."""
        if self.queue is not None:
            self.queue.shutdown(timeout_s)


# -- export ---------------------------------------------------------------------------------


class SpanQueue:
    """A span processor: finished sampled spans wait in a bounded queue that one thread exports
    in batches (the SDK's BatchSpanProcessor, with what it drops counted). Adding a span never
    blocks: when the queue is full the span is dropped (``queue_full``); a batch the exporter
    could not deliver (collector down, answering too late, refusing) is dropped too
    (``export_failed``). Counters: each is written by one thread only (queue_full by the event
    loop, which ends the spans; the others by the export thread)."""

    def __init__(
        self,
        exporter: SpanExporter,
        metrics: Metrics,
        *,
        max_queue_size: int = 2048,
        max_batch_size: int = 512,
        schedule_delay_s: float = 5.0,
    ) -> None:
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.max_batch_size = min(max_batch_size, max_queue_size)
        self.schedule_delay_s = schedule_delay_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dropped_full = metrics.trace_spans_dropped.labels("queue_full")
        self._dropped_failed = metrics.trace_spans_dropped.labels("export_failed")
        self._exported = metrics.trace_spans_exported.labels()

    # SpanProcessor's interface (the SDK calls these).
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def _on_ending(self, span: Span) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopping:
            return
        if len(self._queue) >= self.max_queue_size:
            self._dropped_full.inc()
            return
        self._queue.append(span)
        if len(self._queue) >= self.max_batch_size:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now, on the calling thread."""
        self._export()
        return True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="duoserve-span-export", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        # Ends an export still retrying against a collector that is down.
        self.exporter.shutdown()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.schedule_delay_s)
            self._wake.clear()
            self._export()
        self._export()

    def _export(self) -> None:
        """Export what is queued, a batch at a time (spans that end meanwhile join in)."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._export_lock:
            while self._queue:
                count = min(self.max_batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(count)]
                try:
                    result = self.exporter.export(batch)
                except Exception:  # noqa: BLE001 - an exporter bug must not end the thread
                    log.exception("exporting %d spans failed", count)
                    result = SpanExportResult.FAILURE
                if result is SpanExportResult.SUCCESS:
                    self._exported.inc(count)
                else:
                    self._dropped_failed.inc(count)


# -- configuration --------------------------------------------------------------------------

_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _set(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def traces_endpoint(environ: Mapping[str, str]) -> str | None:
    """Where spans go (OTLP/HTTP), or None when tracing is off: the traces endpoint as given,
    or the OTLP endpoint with ``/v1/traces`` appended, as the OTLP exporter specification
    says. Empty values count as unset; ``OTEL_SDK_DISABLED=true`` and
    ``OTEL_TRACES_EXPORTER=none`` turn it off. TracingConfigError for what the gateway cannot
    do (another exporter, OTLP over gRPC, an unknown sampler)."""
    if (_set(environ, "OTEL_SDK_DISABLED") or "").lower() == "true":
        return None
    exporter = (_set(environ, "OTEL_TRACES_EXPORTER") or "otlp").lower()
    if exporter == "none":
        return None
    endpoint = _set(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint is None:
        base = _set(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if base is None:
            return None
        endpoint = base.rstrip("/") + "/v1/traces"
    if exporter != "otlp":
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={exporter}: the gateway exports traces over OTLP only; "
            "unset it, or set it to otlp or none"
        )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = _set(environ, name)
        if protocol is not None:
            if protocol != "http/protobuf":
                raise TracingConfigError(
                    f"{name}={protocol}: the gateway sends OTLP over HTTP (http/protobuf); point "
                    "OTEL_EXPORTER_OTLP_ENDPOINT at the collector's OTLP/HTTP port (4318)"
                )
            break
    if not endpoint.startswith(("http://", "https://")):
        raise TracingConfigError(
            f"the OTLP endpoint {endpoint!r} is not an http:// or https:// URL"
        )
    sampler = (_set(environ, "OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
    if sampler not in _SAMPLERS:
        raise TracingConfigError(
            f"OTEL_TRACES_SAMPLER={sampler} is not one of {', '.join(_SAMPLERS)}"
        )
    if sampler.endswith("traceidratio"):
        arg = _set(environ, "OTEL_TRACES_SAMPLER_ARG") or "1.0"
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={arg} must be a ratio between 0 and 1 (0.01: 1 %)"
            )
    for name in (
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BSP_SCHEDULE_DELAY",
    ):
        _positive_int(environ, name, 1)
    return endpoint


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = _set(environ, name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and int(value) > 0):
        raise TracingConfigError(f"{name}={value} must be a positive whole number")
    return int(value)


def check_tracing(environ: Mapping[str, str]) -> None:
    """TracingConfigError when the OTEL_* variables cannot work: read at ``duoserve serve``,
    before any worker starts."""
    if traces_endpoint(environ) is None:
        return
    import importlib.util

    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise TracingConfigError(
                f"an OTLP endpoint is set but {module} is not installed: "
                "pip install 'duoserve[tracing]' (the gateway image has it)"
            )


def tracing_from_env(
    environ: Mapping[str, str], metrics: Metrics, *, logs: bool = False
) -> Tracing | None:
    """The gateway's tracing from the ``OTEL_*`` variables; None when there is nothing to do
    per request (no export, and no JSON log wanting request ids)."""
    endpoint = traces_endpoint(environ)
    if endpoint is None:
        return Tracing(None, None, logs=True) if logs else None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError as error:
        raise TracingConfigError(
            f"an OTLP endpoint is set but the OpenTelemetry SDK is not installed ({error.name}): "
            "pip install 'duoserve[tracing]' (the gateway image has it)"
        ) from None

    from duoserve import __version__

    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "duoserve"}))
    # The sampler comes from OTEL_TRACES_SAMPLER / _ARG, read by the SDK (checked above).
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    queue = SpanQueue(
        OTLPSpanExporter(endpoint=endpoint),
        metrics,
        max_queue_size=_positive_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        max_batch_size=_positive_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        schedule_delay_s=_positive_int(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
    )
    provider.add_span_processor(queue)  # type: ignore[arg-type]
    return Tracing(provider, queue, logs=logs)
