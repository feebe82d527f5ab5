"""A test OTLP/HTTP trace receiver: what a collector's ``/v1/traces`` endpoint does, decoding
the real protobuf messages with ``opentelemetry-proto``.

    receiver = OTLPReceiver()            # 127.0.0.1:<free port>, in a thread
    env OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url
    spans = receiver.wait_for(lambda spans: ..., timeout_s=10)
    receiver.close()

It can answer late (``delay_s``, a collector that is slow), hold every export unanswered until
``release()`` (``hold()``: a collector that hangs; ``waiting`` counts the exports it holds), and
is stopped by ``close()``; a collector that is down is a port nobody listens on
(``tests.servers.free_port``).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from tests.loopback_http import LoopbackHTTPServer


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


KINDS = {
    SpanProto.SPAN_KIND_INTERNAL: "internal",
    SpanProto.SPAN_KIND_SERVER: "server",
    SpanProto.SPAN_KIND_CLIENT: "client",
    SpanProto.SPAN_KIND_PRODUCER: "producer",
    SpanProto.SPAN_KIND_CONSUMER: "consumer",
}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, ids in hex as W3C headers write them."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    attributes: dict[str, Any]
    status_code: int
    """0 unset, 1 ok, 2 error."""
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


class OTLPReceiver:
    """POST /v1/traces on 127.0.0.1 (binary protobuf, gzip or not), answered with an empty
    ExportTraceServiceResponse after ``delay_s``; every span kept in ``spans``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.waiting = 0
        """Exports being held unanswered now (``hold``)."""
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                receiver._wait_at_gate()
                receiver._keep(ExportTraceServiceRequest.FromString(body))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._http = LoopbackHTTPServer(Handler)

    @property
    def url(self) -> str:
        """The OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): /v1/traces is appended to it."""
        return self._http.url

    def hold(self) -> None:
        """From now on, hold every export unanswered (and its spans unread) until release()."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def _wait_at_gate(self) -> None:
        if self._gate.is_set():
            return
        with self._lock:
            self.waiting += 1
        self._gate.wait()
        with self._lock:
            self.waiting -= 1

    def _keep(self, message: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in message.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=KINDS.get(span.kind, "unspecified"),
                            attributes={kv.key: _value(kv.value) for kv in span.attributes},
                            status_code=span.status.code,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            resource=resource,
                            scope=scope_spans.scope.name,
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.snapshot() if s.trace_id == trace_id]

    def wait_for(
        self, ready: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 15.0
    ) -> list[ReceivedSpan]:
        """The spans received, once ``ready(spans)`` holds; AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.snapshot()
            if ready(spans):
                return spans
            if time.monotonic() > deadline:
                names = [(s.name, s.trace_id[:8]) for s in spans]
                raise AssertionError(f"spans never arrived as expected; received: {names}")
            time.sleep(0.05)

    def close(self) -> None:
        self.release()
        self._http.close()
