"""Traces, as an operator sees them: the spans a collector receives for one request, and the W3C
trace context each backend received.

The gateway runs in-process with the standard ``OTEL_*`` variables pointing at a test OTLP/HTTP
receiver (tests/otlp_receiver.py, which decodes the real protobuf messages). Backends: the TF
Serving stand-in over gRPC and REST (it records the ``traceparent`` each Predict carried), and a
small HTTP server standing in for TorchServe and for a V2 server (TorchServe cannot show the
headers it received; this one records them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DIGITS_IO, GatewayFactory, v2_body
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan
from tests.recording_backend import RecordingBackend
from tests.servers import free_port, wait_until

pytestmark = pytest.mark.integration

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
"""A caller's sampled span (W3C's own example ids)."""
PIXELS = np.arange(2 * 64, dtype=np.float32).reshape(2, 8, 8) % 17


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    collector = OTLPReceiver()
    try:
        yield collector
    finally:
        collector.close()


@pytest.fixture
def recording() -> Iterator[RecordingBackend]:
    backend = RecordingBackend()
    try:
        yield backend
    finally:
        backend.close()


def trace_to(monkeypatch: pytest.MonkeyPatch, endpoint: str, **extra: str) -> None:
    """The OTEL_* variables an operator sets, read when the gateway is built."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "duoserve-test",
        # A caller's sampled trace is always traced; of the others, none (ratio 0).
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **extra,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def one_model(backends: dict[str, Any], routes: list[dict[str, Any]], **extra: Any) -> Any:
    return {"backends": backends, "models": {"digits": {**DIGITS_IO, "routes": routes, **extra}}}


async def infer(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    answer = await client.post("/v2/models/digits/infer", json=v2_body(PIXELS), headers=headers)
    assert answer.status_code == 200, answer.text
    return answer


def by_parent(spans: list[ReceivedSpan], parent: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent]


async def request_span(
    receiver: OTLPReceiver, children: int = 1
) -> tuple[ReceivedSpan, list[Any]]:
    """The caller's request: the gateway's SERVER span, once it and ``children`` spans under it
    arrived; and the whole trace. (Waits in a thread: the gateway's loop runs meanwhile.)"""

    def complete(spans: list[ReceivedSpan]) -> bool:
        servers = [s for s in spans if s.trace_id == CALLER_TRACE and s.kind == "server"]
        return bool(servers) and len(by_parent(spans, servers[0].span_id)) >= children

    await asyncio.to_thread(receiver.wait_for, complete)
    trace = receiver.trace(CALLER_TRACE)
    [server] = [s for s in trace if s.kind == "server"]
    return server, trace


def check_request_span(server: ReceivedSpan, framework: str, backend: str) -> None:
    """The gateway's span of a V2 request that succeeded: a child of the caller's span, with
    the documented attributes."""
    assert (server.trace_id, server.parent_span_id) == (CALLER_TRACE, CALLER_SPAN)
    attributes = server.attributes
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"].startswith("/v2/models/")
    assert attributes["url.path"] == "/v2/models/digits/infer"
    assert attributes["duoserve.front_door"] == "v2"
    assert attributes["duoserve.model"] == "digits"
    assert attributes["duoserve.framework"] == framework
    assert attributes["duoserve.backend"] == backend
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.response.header.x-request-id"] == ["req-traced-1"]
    assert attributes["duoserve.outcome"] == "ok"
    assert server.resource["service.name"] == "duoserve-test"
    assert server.scope == "duoserve"


def check_backend_span(call: ReceivedSpan, server: ReceivedSpan, backend: str) -> None:
    assert call.kind == "client"
    assert (call.trace_id, call.parent_span_id) == (CALLER_TRACE, server.span_id)
    assert call.attributes["duoserve.backend"] == backend
    assert call.attributes["duoserve.backend_model"] == "digits"
    assert call.attributes["duoserve.attempt"] == 1
    assert call.attributes["duoserve.call"] == "first"
    assert call.attributes["duoserve.outcome"] == "ok"
    assert call.attributes["server.address"] == "127.0.0.1"
    assert call.attributes["network.peer.address"] == "127.0.0.1"
    assert call.status_code != 2  # not an error
    assert call.start_ns >= server.start_ns and call.end_ns <= server.end_ns


# -- one request, its spans, and what the backend received -----------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
async def test_tfserving_call_is_a_child_span_and_carries_the_trace(
    protocol: str,
    tfserving: Any,
    gateway: GatewayFactory,
    receiver: OTLPReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace_to(monkeypatch, receiver.url)
    where = {"grpc": tfserving.grpc_address} if protocol == "grpc" else {"url": tfserving.rest_url}
    config = one_model(
        {"tfs": {"kind": "tfserving", "protocol": protocol, **where}},
        [{"backend": "tfs", "framework": "tensorflow", "model": "digits"}],
    )
    async with gateway(config) as (client, _):
        await infer(client, {"traceparent": CALLER, "x-request-id": "req-traced-1"})
        server, trace = await request_span(receiver)
        openmetrics = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )

    check_request_span(server, "tensorflow", "tfs")
    [call] = by_parent(trace, server.span_id)
    check_backend_span(call, server, "tfs")
    port = tfserving.grpc_port if protocol == "grpc" else tfserving.rest_port
    assert call.attributes["server.port"] == port
    if protocol == "grpc":
        assert call.name == "tensorflow.serving.PredictionService/Predict"
        assert call.attributes["rpc.system.name"] == "grpc"
        assert call.attributes["rpc.method"] == "tensorflow.serving.PredictionService/Predict"
        assert call.attributes["rpc.response.status_code"] == "OK"
    else:
        assert call.name == "POST /v1/models/{model}:predict"
        assert call.attributes["url.template"] == "/v1/models/{model}:predict"
        assert call.attributes["url.full"] == f"{tfserving.rest_url}/v1/models/digits:predict"
        assert call.attributes["http.response.status_code"] == 200

    # TF Serving received the same trace, with the gateway's backend span as the parent.
    received = tfserving.trace_contexts()[-1]
    assert received["api"] == protocol
    assert received["traceparent"] == f"00-{CALLER_TRACE}-{call.span_id}-01"

    # The latency histograms carry the trace id as an OpenMetrics exemplar.
    assert f'trace_id="{CALLER_TRACE}"' in next(
        line
        for line in openmetrics.text.splitlines()
        if line.startswith("duoserve_request_duration_seconds_bucket{") and " # {" in line
    )


@pytest.mark.parametrize("kind", ["torchserve", "v2"])
async def test_http_backend_call_carries_the_trace(
    kind: str,
    gateway: GatewayFactory,
    receiver: OTLPReceiver,
    recording: RecordingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace_to(monkeypatch, receiver.url)
    config = one_model(
        {"remote": {"kind": kind, "url": recording.url, "binary_tensors": False}},
        [{"backend": "remote", "framework": "pytorch", "model": "digits"}],
    )
    async with gateway(config) as (client, _):
        await infer(
            client,
            {"traceparent": CALLER, "tracestate": "vendor=1", "x-request-id": "req-traced-1"},
        )
        server, trace = await request_span(receiver)

    check_request_span(server, "pytorch", "remote")
    [call] = by_parent(trace, server.span_id)
    check_backend_span(call, server, "remote")
    path = "/predictions/digits" if kind == "torchserve" else "/v2/models/digits/infer"
    template = "/predictions/{model}" if kind == "torchserve" else "/v2/models/{model}/infer"
    assert call.name == f"POST {template}"
    assert call.attributes["url.full"] == recording.url + path
    assert call.attributes["http.response.status_code"] == 200
    [(received_path, headers)] = recording.received
    assert received_path == path
    assert headers["traceparent"] == f"00-{CALLER_TRACE}-{call.span_id}-01"
    assert headers["tracestate"] == "vendor=1"


async def test_a_real_torchserve_call_is_a_child_span(
    torchserve: Any,
    gateway: GatewayFactory,
    receiver: OTLPReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real TorchServe: it cannot show the headers it received (the stand-in above checks
    those); its call is a span of the request with the answer's status."""
    trace_to(monkeypatch, receiver.url)
    config = one_model(
        {
            "ts": {
                "kind": "torchserve",
                "url": torchserve.url,
                "token_file": str(torchserve.key_file),
            }
        },
        [{"backend": "ts", "framework": "pytorch", "model": "digits"}],
    )
    async with gateway(config) as (client, _):
        await infer(client, {"traceparent": CALLER, "x-request-id": "req-traced-1"})
        server, trace = await request_span(receiver)

    check_request_span(server, "pytorch", "ts")
    [call] = by_parent(trace, server.span_id)
    check_backend_span(call, server, "ts")
    assert call.name == "POST /predictions/{model}"
    assert call.attributes["url.full"] == f"{torchserve.url}/predictions/digits"
    assert call.attributes["http.response.status_code"] == 200
    # The token it was sent is nowhere in the span.
    assert torchserve.inference_key() not in repr(call)


async def test_unsampled_requests_make_no_spans_and_pass_their_context_on(
    gateway: GatewayFactory,
    receiver: OTLPReceiver,
    recording: RecordingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """parentbased_traceidratio at 0: a request without a trace is not traced, nor is one whose
    caller did not sample it; the backend still gets a trace context, flagged unsampled."""
    trace_to(monkeypatch, receiver.url)
    config = one_model(
        {"ts": {"kind": "torchserve", "url": recording.url, "binary_tensors": False}},
        [{"backend": "ts", "framework": "pytorch", "model": "digits"}],
    )
    unsampled = f"00-{'a' * 32}-{'b' * 16}-00"
    async with gateway(config) as (client, _):
        await infer(client, {})
        await infer(client, {"traceparent": unsampled})
        await infer(client, {"traceparent": CALLER, "x-request-id": "req-traced-1"})
        await request_span(receiver)
    # Spans are exported in the order they ended: the first two requests' would have come first.
    assert {s.trace_id for s in receiver.snapshot()} == {CALLER_TRACE}
    first, second, _ = recording.traceparents()
    assert first is not None and second is not None
    assert second.startswith(f"00-{'a' * 32}-")  # the caller's trace
    # The sampled flag (bit 0 of the trace flags) is off in both.
    assert int(first[-2:], 16) & 1 == 0 and int(second[-2:], 16) & 1 == 0


async def test_tracing_off_passes_the_callers_context_on_unchanged(
    gateway: GatewayFactory, recording: RecordingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    config = one_model(
        {"ts": {"kind": "torchserve", "url": recording.url, "binary_tensors": False}},
        [{"backend": "ts", "framework": "pytorch", "model": "digits"}],
    )
    async with gateway(config) as (client, app):
        assert app.state.gateway.tracing is None  # nothing per request
        await infer(client, {"traceparent": CALLER, "tracestate": "vendor=1"})
        await infer(client, {})
        await infer(client, {"traceparent": "00-not-a-trace-context-01"})
    sent = [(h.get("traceparent"), h.get("tracestate")) for _, h in recording.received]
    assert sent == [(CALLER, "vendor=1"), (None, None), (None, None)]


# -- retries, failover, shadow ---------------------------------------------------------------


async def test_retry_failover_and_shadow_are_spans_of_the_same_trace(
    tfserving: Any,
    gateway: GatewayFactory,
    receiver: OTLPReceiver,
    recording: RecordingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first route's two replicas are down: its call, its retry on the other replica, then
    the failover to TF Serving; a shadow copy goes to TorchServe. Each is a span."""
    trace_to(monkeypatch, receiver.url)
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    config = one_model(
        {
            "down": {"kind": "tfserving", "protocol": "grpc", "endpoints": dead, "retries": 1},
            "tfs": {"kind": "tfserving", "protocol": "rest", "url": tfserving.rest_url},
            "ts": {"kind": "torchserve", "url": recording.url, "binary_tensors": False},
        },
        [
            {"backend": "down", "framework": "tensorflow", "model": "digits", "weight": 1},
            {"backend": "tfs", "framework": "tensorflow", "model": "digits", "weight": 0},
        ],
        failover=True,
        shadow={"backend": "ts", "framework": "pytorch", "model": "digits", "sample": 1.0},
    )
    async with gateway(config) as (client, _):
        await infer(client, {"traceparent": CALLER, "x-request-id": "req-traced-1"})
        # Three backend calls and the shadow leg under the request's span.
        server, trace = await request_span(receiver, children=4)
        await asyncio.to_thread(
            receiver.wait_for, lambda spans: sum(s.kind == "client" for s in spans) >= 4
        )
        trace = receiver.trace(CALLER_TRACE)

    check_request_span(server, "tensorflow", "tfs")
    calls = sorted(by_parent(trace, server.span_id), key=lambda s: s.start_ns)
    summary = [
        (s.name, s.attributes.get("duoserve.backend"), s.attributes.get("duoserve.call"))
        for s in calls
    ]
    assert summary == [
        ("tensorflow.serving.PredictionService/Predict", "down", "first"),
        ("tensorflow.serving.PredictionService/Predict", "down", "retry"),
        ("POST /v1/models/{model}:predict", "tfs", "failover"),
        ("duoserve shadow", "ts", None),
    ]
    first, retry, failover, shadow = calls
    for failed in (first, retry):
        assert failed.status_code == 2  # error
        assert failed.attributes["duoserve.outcome"] != "ok"
        assert failed.attributes["error.type"] == failed.attributes["duoserve.outcome"]
    assert (first.attributes["duoserve.attempt"], retry.attributes["duoserve.attempt"]) == (1, 2)
    # Each replica once: the retry went to the other one.
    assert {first.attributes["server.port"], retry.attributes["server.port"]} == {
        int(d.rsplit(":", 1)[1]) for d in dead
    }
    assert failover.attributes["duoserve.outcome"] == "ok"
    assert shadow.attributes["duoserve.leg"] == "shadow"
    assert shadow.attributes["duoserve.outcome"] == "ok"
    assert shadow.attributes["duoserve.shadow.rows"] == 2
    [shadow_call] = by_parent(trace, shadow.span_id)
    assert shadow_call.kind == "client"
    assert shadow_call.attributes["duoserve.backend"] == "ts"
    # TF Serving and the shadow's TorchServe each received the trace, parented by their span.
    assert tfserving.trace_contexts()[-1]["traceparent"] == (
        f"00-{CALLER_TRACE}-{failover.span_id}-01"
    )
    assert recording.traceparents() == [f"00-{CALLER_TRACE}-{shadow_call.span_id}-01"]


async def test_each_compare_leg_is_a_span_with_its_backend_call_below(
    gateway: GatewayFactory,
    receiver: OTLPReceiver,
    recording: RecordingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace_to(monkeypatch, receiver.url)
    config = one_model(
        {
            "ts": {"kind": "torchserve", "url": recording.url, "binary_tensors": False},
            "v2": {"kind": "v2", "url": recording.url, "binary_tensors": False},
        },
        [
            {"backend": "ts", "framework": "pytorch", "model": "digits"},
            {"backend": "v2", "framework": "tensorflow", "model": "digits"},
        ],
    )
    async with gateway(config) as (client, _):
        answer = await client.post(
            "/v2/models/digits/compare",
            json=v2_body(PIXELS),
            headers={"traceparent": CALLER, "x-request-id": "req-traced-1"},
        )
        assert answer.status_code == 200, answer.text
        server, trace = await request_span(receiver, children=2)

    assert (server.parent_span_id, server.attributes["http.response.status_code"]) == (
        CALLER_SPAN,
        200,
    )
    legs = by_parent(trace, server.span_id)
    assert sorted((s.name, s.attributes["duoserve.backend"]) for s in legs) == [
        ("duoserve compare", "ts"),
        ("duoserve compare", "v2"),
    ]
    sent = set(recording.traceparents())
    for leg in legs:
        [call] = by_parent(trace, leg.span_id)
        assert call.attributes["duoserve.backend"] == leg.attributes["duoserve.backend"]
        assert f"00-{CALLER_TRACE}-{call.span_id}-01" in sent


# -- a collector that is down or hangs -------------------------------------------------------


def spans_counted(text: str) -> dict[str, float]:
    """duoserve_trace_spans_{exported,dropped}_total from the /metrics text, by reason."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "duoserve_trace_spans_exported_total":
                counts["exported"] = sample.value
            elif sample.name == "duoserve_trace_spans_dropped_total":
                counts[sample.labels["reason"]] = sample.value
    return counts


async def test_a_hung_collector_delays_no_request_and_its_spans_are_counted_as_dropped(
    gateway: GatewayFactory,
    receiver: OTLPReceiver,
    recording: RecordingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace_to(
        monkeypatch,
        receiver.url,
        OTEL_BSP_MAX_QUEUE_SIZE="4",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2",
        # The held export is not given up on while held (it would be counted as failed, and
        # resent): the spans are accounted for exactly.
        OTEL_EXPORTER_OTLP_TIMEOUT="120",
    )
    config = one_model(
        {"ts": {"kind": "torchserve", "url": recording.url, "binary_tensors": False}},
        [{"backend": "ts", "framework": "pytorch", "model": "digits"}],
    )
    sampled = {"traceparent": CALLER}
    receiver.hold()
    async with gateway(config) as (client, _):
        await infer(client, sampled)
        await asyncio.to_thread(wait_until, lambda: receiver.waiting >= 1, 30, "the first export")
        for _ in range(20):
            await infer(client, sampled)
        # Every request was answered while the collector still held the first export.
        assert receiver.waiting >= 1
        assert len(recording.received) == 21
        held = spans_counted((await client.get("/metrics")).text)
        receiver.release()
        # 2 spans a request; all accounted for once the held export is answered.
        total = 2 * 21

        async def accounted() -> dict[str, float]:
            return spans_counted((await client.get("/metrics")).text)

        for _ in range(600):
            counts = await accounted()
            if sum(counts.values()) >= total:
                break
            await asyncio.sleep(0.1)
    assert held.get("queue_full", 0) >= total - 2 - 4  # beyond the held batch and the queue
    assert sum(counts.values()) == total
    assert counts["exported"] == len(receiver.snapshot())


async def test_a_collector_that_is_down_fails_no_request_and_its_spans_are_counted(
    gateway: GatewayFactory,
    recording: RecordingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace_to(monkeypatch, f"http://127.0.0.1:{free_port()}", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    config = one_model(
        {"ts": {"kind": "torchserve", "url": recording.url, "binary_tensors": False}},
        [{"backend": "ts", "framework": "pytorch", "model": "digits"}],
    )
    async with gateway(config) as (client, _):
        for _ in range(5):
            await infer(client, {"traceparent": CALLER})
        for _ in range(600):  # each batch fails after the 1 s export timeout
            counts = spans_counted((await client.get("/metrics")).text)
            if counts.get("export_failed", 0) >= 10:
                break
            await asyncio.sleep(0.1)
    assert counts.get("export_failed") == 10
    assert counts.get("exported", 0) == 0
