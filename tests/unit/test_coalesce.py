"""Coalescing of concurrent requests into one remote backend call (backends/coalesce.py),
against a fake backend whose calls the test holds and releases: which requests are combined,
what each caller gets back, errors, deadlines and cancelled callers. The same over HTTP to a
scripted TorchServe, through the whole gateway, is at the end; against a real TorchServe in
tests/integration/test_coalesce_torchserve.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from duoserve.backends.endpoints import EndpointSet, ReplicatedBackend
from duoserve.config import CoalesceConfig, ConfigError, TorchServeBackendConfig, parse_config
from duoserve.errors import UpstreamError, UpstreamTimeout
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from tests.conftest import DIGITS_IO, GatewayFactory
from tests.timing import eventually
from tests.unit.test_httpclient import ok, scripted


class Transport:
    def __init__(self, host: str, port: int) -> None:
        self.address = f"{host}:{port}"

    async def close(self) -> None:
        pass


async def always(transport: Transport) -> bool:
    return True


class FakeBackend(ReplicatedBackend[Transport]):
    """One replica; every call is logged, answers each row with its pixel sum (times the
    version number), and waits to be released while ``hold`` is set."""

    kind = "fake"

    def __init__(self, coalesce: dict[str, Any] | None, replicas: int = 1) -> None:
        super().__init__("fake")
        self.metrics = Metrics(CollectorRegistry())
        self.endpoints = EndpointSet(
            "fake",
            [(f"10.0.0.{i}", 1) for i in range(1, replicas + 1)],
            connect=Transport,
            disconnect=Transport.close,
            probe=always,
            what="Fake",
            metrics=self.metrics,
        )
        self.coalesce(None if coalesce is None else CoalesceConfig.model_validate(coalesce))
        self.calls: list[InferenceRequest] = []
        self.releases: list[asyncio.Event] = []
        self.hold = False
        self.fail: Exception | None = None
        self.model = answer
        self.cancelled = 0

    async def infer_on(
        self, transport: Transport, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        self.calls.append(request)
        release = asyncio.Event()
        self.releases.append(release)
        if not self.hold:
            release.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return self.model(request)

    def release(self) -> None:
        for event in self.releases:
            event.set()

    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        return True

    def rows_per_call(self) -> list[int]:
        return [call.batch_size() for call in self.calls]

    def batch_rows(self) -> tuple[float | None, float | None]:
        """(calls, rows) from duoserve_backend_batch_rows."""
        registry = self.metrics.registry
        labels = {"backend": "fake"}
        return (
            registry.get_sample_value("duoserve_backend_batch_rows_count", labels),
            registry.get_sample_value("duoserve_backend_batch_rows_sum", labels),
        )


def answer(request: InferenceRequest) -> InferenceResponse:
    """What the fake model answers: per row, its sum times the version (1 without one)."""
    pixels = request.inputs[0].data
    scale = float(request.version or 1)
    sums = pixels.reshape(pixels.shape[0], -1).sum(axis=1, keepdims=True) * scale
    return InferenceResponse(
        model_name=request.model,
        model_version=request.version,
        outputs=[Tensor.from_array("sums", sums.astype(np.float32))],
        id=request.id,
    )


def request(
    seed: int,
    rows: int = 1,
    *,
    side: int = 8,
    version: str | None = None,
    **extra: Any,
) -> InferenceRequest:
    """A request whose rows are its own: values start at ``seed`` x 1000."""
    pixels = (seed * 1000 + np.arange(rows * side * side, dtype=np.float32)).reshape(
        rows, side, side
    )
    return InferenceRequest(
        model="digits",
        version=version,
        inputs=[Tensor("pixels", pixels, "FP32")],
        id=f"req-{seed}",
        **extra,
    )


async def settle() -> None:
    """Let every task that can run get as far as it can (the fake does no I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


def start(
    backend: FakeBackend, requests: Iterable[InferenceRequest], budget_s: float = 30.0
) -> list[asyncio.Task[InferenceResponse]]:
    return [asyncio.create_task(backend.infer(r, Deadline(budget_s))) for r in requests]


def assert_own_rows(request: InferenceRequest, response: InferenceResponse) -> None:
    expected = answer(request)
    assert response.id == request.id
    assert [t.name for t in response.outputs] == ["sums"]
    np.testing.assert_array_equal(response.outputs[0].data, expected.outputs[0].data)


async def test_requests_queued_behind_a_call_in_flight_go_out_together_with_their_own_rows() -> (
    None
):
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    assert backend.rows_per_call() == [1]  # alone, at once: nothing to wait for
    queued_requests = [request(i, rows) for i, rows in enumerate([2, 1, 3, 1], start=1)]
    queued = start(backend, queued_requests)
    await settle()
    assert backend.rows_per_call() == [1]  # the slot is taken: they wait
    backend.hold = False
    backend.release()
    answers = await asyncio.gather(*first, *queued)
    assert backend.rows_per_call() == [1, 7]
    for sent, got in zip([request(0), *queued_requests], answers, strict=True):
        assert_own_rows(sent, got)
    assert backend.batch_rows() == (2, 8)

    # The same requests uncoalesced answer the same.
    plain = FakeBackend(None)
    for sent, got in zip([request(0), *queued_requests], answers, strict=True):
        alone = await plain.infer(sent, Deadline(5))
        np.testing.assert_array_equal(alone.outputs[0].data, got.outputs[0].data)
    await backend.close()


async def test_only_requests_alike_are_combined() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    plain = [request(1), request(6, rows=2)]
    others = [
        request(2, version="2"),  # another version: its own group, with a free slot
        request(3, side=4),  # other non-batch dimensions
        request(4, outputs=[RequestedOutput("sums")]),  # other requested outputs
        request(5, parameters={"signature_name": "other"}),  # other parameters
    ]
    tasks = start(backend, [plain[0], *others, plain[1]])
    await settle()
    assert backend.rows_per_call() == [1, 1]  # version 2 went at once
    assert backend.calls[1].version == "2"
    backend.hold = False
    backend.release()
    answers = await asyncio.gather(*tasks)
    for sent, got in zip([plain[0], *others, plain[1]], answers, strict=True):
        assert_own_rows(sent, got)
    # After the first call: the two plain requests together (3 rows), then one call each.
    assert backend.rows_per_call()[2:] == [3, 1, 1, 1]
    assert backend.calls[3].inputs[0].data.shape == (1, 4, 4)
    assert backend.calls[4].outputs is not None
    assert backend.calls[5].parameters == {"signature_name": "other"}
    await asyncio.gather(*first)
    await backend.close()


async def test_a_combined_call_holds_at_most_max_batch_size_rows() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1, "max_batch_size": 8})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    queued_requests = [request(i) for i in range(1, 13)] + [request(13, rows=20)]
    queued = start(backend, queued_requests)
    await settle()
    backend.hold = False
    backend.release()
    answers = await asyncio.gather(*queued)
    assert backend.rows_per_call() == [1, 8, 4, 20]  # a bigger request still goes, alone
    for sent, got in zip(queued_requests, answers, strict=True):
        assert_own_rows(sent, got)
    await asyncio.gather(*first)
    await backend.close()


async def test_several_calls_in_flight_before_requests_queue() -> None:
    backend = FakeBackend({"max_calls_in_flight": 3})
    backend.hold = True
    tasks = start(backend, [request(i) for i in range(7)])
    await settle()
    assert backend.rows_per_call() == [1, 1, 1]
    backend.releases[0].set()  # one returns: the four queued go out as one call
    await settle()
    assert backend.rows_per_call() == [1, 1, 1, 4]
    backend.hold = False
    backend.release()
    await asyncio.gather(*tasks)
    await backend.close()


async def test_each_replica_in_rotation_takes_max_calls_in_flight() -> None:
    """Three replicas take three calls at once where one takes one: coalescing must not funnel
    a scaled-out backend through one replica's worth of calls."""
    backend = FakeBackend({"max_calls_in_flight": 1}, replicas=3)
    await backend.start()
    assert len(backend.endpoints.usable) == 3
    backend.hold = True
    first = start(backend, [request(i) for i in range(3)])
    await settle()
    assert backend.rows_per_call() == [1, 1, 1]  # one each, at once: no queue yet
    queued = start(backend, [request(3), request(4, rows=2)])
    await settle()
    assert backend.rows_per_call() == [1, 1, 1]  # every slot taken: they wait
    backend.hold = False
    backend.release()
    answers = await asyncio.gather(*first, *queued)
    assert backend.rows_per_call() == [1, 1, 1, 3]
    for sent, got in zip([*(request(i) for i in range(3)), request(3), request(4, rows=2)],
                         answers, strict=True):  # fmt: skip
        assert_own_rows(sent, got)
    await backend.close()


async def test_a_replica_that_joins_takes_queued_requests_at_once() -> None:
    """The limit grows with the rotation: what queued behind one replica's calls goes out to
    a replica that joins, without waiting for a call to return."""
    backend = FakeBackend({"max_calls_in_flight": 1})
    await backend.start()
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    queued = start(backend, [request(1), request(2)])
    await settle()
    assert backend.rows_per_call() == [1]  # the one slot is taken: they wait
    backend.endpoints._apply([("10.0.0.1", 1), ("10.0.0.2", 1)], initial=False)
    await settle()
    assert backend.rows_per_call() == [1, 2]  # out together, while the first call still runs
    backend.hold = False
    backend.release()
    answers = await asyncio.gather(*first, *queued)
    for sent, got in zip([request(0), request(1), request(2)], answers, strict=True):
        assert_own_rows(sent, got)
    await backend.close()


async def test_an_error_of_a_combined_call_reaches_every_request_in_it() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    queued = start(backend, [request(i) for i in range(1, 4)])
    await settle()
    backend.fail = UpstreamError("the Fake backend failed")
    backend.hold = False
    backend.release()
    outcomes = await asyncio.gather(*first, *queued, return_exceptions=True)
    assert backend.rows_per_call() == [1, 3]
    assert all(isinstance(o, UpstreamError) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 4  # each its own copy, for the data plane to mark
    assert all(o.endpoint == "10.0.0.1:1" for o in outcomes)  # type: ignore[union-attr]
    assert all(str(o) == "the Fake backend failed" for o in outcomes)
    backend.fail = None
    assert_own_rows(request(9), await backend.infer(request(9), Deadline(5)))
    await backend.close()


async def test_an_answer_without_a_row_per_request_row_is_an_error_for_each() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    queued = start(backend, [request(1), request(2)])
    await settle()

    def scalar(request: InferenceRequest) -> InferenceResponse:
        return InferenceResponse("digits", [Tensor.from_array("sums", np.float32(1.0))])

    backend.model = scalar
    backend.hold = False
    backend.release()
    await asyncio.gather(*first)  # alone: passed on as it is, whatever its shape
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, UpstreamError) for o in outcomes), outcomes
    await backend.close()


async def test_a_deadline_that_passes_in_the_queue_times_out_that_request_only() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    hurried = asyncio.create_task(backend.infer(request(1), Deadline(0.05)))
    patient = start(backend, [request(2)])
    with pytest.raises(UpstreamTimeout, match="did not answer within the deadline"):
        await hurried
    backend.hold = False
    backend.release()
    answers = await asyncio.gather(*first, *patient)
    assert backend.rows_per_call() == [1, 1]  # the timed-out request was not sent
    assert_own_rows(request(2), answers[1])
    await backend.close()


async def test_a_deadline_that_passes_in_a_combined_call_leaves_the_others_their_answers() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    hurried = asyncio.create_task(backend.infer(request(1), Deadline(0.2)))
    patient = start(backend, [request(2)])
    await settle()
    backend.releases[0].set()  # the first returns; the two go out together and are held
    await settle()
    assert backend.rows_per_call() == [1, 2]
    with pytest.raises(UpstreamTimeout):
        await hurried
    assert backend.cancelled == 0  # the other still waits for that call
    backend.release()
    answers = await asyncio.gather(*first, *patient)
    assert_own_rows(request(2), answers[1])
    await backend.close()


async def test_a_cancelled_waiter_is_dropped_and_a_call_nobody_waits_for_is_cancelled() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    leaving, staying = start(backend, [request(1), request(2)])
    await settle()
    leaving.cancel()
    await settle()
    backend.hold = False
    backend.release()
    answer_2 = await staying
    assert backend.rows_per_call() == [1, 1]  # the cancelled request was not sent
    assert_own_rows(request(2), answer_2)
    assert leaving.cancelled()
    await asyncio.gather(*first)

    backend.hold = True
    alone = start(backend, [request(3)])
    await settle()
    alone[0].cancel()  # its client left: nobody waits for the call any more
    await eventually(lambda: backend.cancelled == 1, "the call nobody waits for is cancelled")
    backend.hold = False
    backend.release()
    assert_own_rows(request(4), await backend.infer(request(4), Deadline(5)))
    await backend.close()


async def test_max_delay_holds_a_call_for_others_unless_it_is_full() -> None:
    backend = FakeBackend({"max_delay_ms": 50, "max_calls_in_flight": 4})
    tasks = start(backend, [request(1), request(2)])
    await settle()
    assert backend.calls == []  # waiting for more to join
    answers = await asyncio.gather(*tasks)
    assert backend.rows_per_call() == [2]
    assert_own_rows(request(2), answers[1])

    full = FakeBackend({"max_delay_ms": 1000, "max_batch_size": 2})
    tasks = start(full, [request(1), request(2), request(3)])
    await settle()
    assert full.rows_per_call() == [2]  # full: out at once; the third waits
    await full.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    await backend.close()


async def test_retries_and_requests_that_cannot_be_combined_go_on_their_own() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    first = start(backend, [request(0)])
    await settle()
    retry = asyncio.create_task(backend.infer(request(1), Deadline(5), avoid=["10.0.0.9:1"]))
    scalar = InferenceRequest("digits", [Tensor("pixels", np.float32(3.0), "FP32")])
    odd = InferenceRequest(
        "digits",
        [
            Tensor("a", np.zeros((2, 3), np.float32), "FP32"),
            Tensor("b", np.zeros((1, 3), np.float32), "FP32"),
        ],
    )
    tasks = start(backend, [scalar, odd])
    await settle()
    assert len(backend.calls) == 4  # none of them waited for the slot
    backend.hold = False
    backend.release()
    await asyncio.gather(*first, retry)
    await asyncio.gather(*tasks, return_exceptions=True)
    await backend.close()


async def test_off_by_default_every_request_is_its_own_call() -> None:
    config = TorchServeBackendConfig.model_validate({"kind": "torchserve", "url": "http://x:1"})
    assert config.coalesce is None
    backend = FakeBackend(None)
    assert backend.coalescer is None
    backend.hold = True
    tasks = start(backend, [request(i) for i in range(6)])
    await settle()
    backend.release()
    answers = await asyncio.gather(*tasks)
    assert backend.rows_per_call() == [1] * 6
    assert backend.batch_rows() == (None, None)  # no series without coalescing
    for i, got in enumerate(answers):
        assert_own_rows(request(i), got)
    await backend.close()


async def test_close_fails_queued_requests_and_stops_combined_calls() -> None:
    backend = FakeBackend({"max_calls_in_flight": 1})
    backend.hold = True
    alone, *queued = start(backend, [request(0), request(1), request(2), request(3)])
    await settle()
    backend.releases[0].set()  # the three queued go out together, and are held
    await settle()
    assert backend.rows_per_call() == [1, 3]
    late = start(backend, [request(4)])
    await settle()
    await backend.close()
    outcomes = await asyncio.gather(*queued, *late, return_exceptions=True)
    assert all(isinstance(o, Exception) and getattr(o, "status", 0) == 503 for o in outcomes)
    assert_own_rows(request(0), await alone)  # made in its own task: ends as its call does


def test_coalesce_settings_are_validated() -> None:
    def config(coalesce: Any) -> dict[str, Any]:
        backend = {"kind": "torchserve", "url": "http://ts:8080", "coalesce": coalesce}
        routes = [{"backend": "ts", "framework": "pytorch"}]
        return {"backends": {"ts": backend}, "models": {"digits": {**DIGITS_IO, "routes": routes}}}

    defaults = parse_config(config({})).backends["ts"].coalesce
    assert defaults == CoalesceConfig(max_batch_size=8, max_delay_ms=0, max_calls_in_flight=2)
    for bad, where in [
        ({"max_batch_size": 0}, "backends.ts.coalesce.max_batch_size"),
        ({"max_delay_ms": -1}, "backends.ts.coalesce.max_delay_ms"),
        ({"max_calls_in_flight": 0}, "backends.ts.coalesce.max_calls_in_flight"),
        ({"max_batch": 8}, "backends.ts.coalesce.max_batch"),
    ]:
        with pytest.raises(ConfigError, match=where):
            parse_config(config(bad))
    tfs = {"kind": "tfserving", "grpc": "tfs:8500", "coalesce": {"max_batch_size": 4}}
    parsed = parse_config(
        {
            "backends": {"tfs": tfs},
            "models": {
                "digits": {**DIGITS_IO, "routes": [{"backend": "tfs", "framework": "tensorflow"}]}
            },
        }
    )
    assert parsed.backends["tfs"].coalesce == CoalesceConfig(max_batch_size=4)


# -- through the gateway, over HTTP to a scripted TorchServe ---------------------------------


class ScriptedTorchServe:
    """Answers /predictions/digits as DuoServe's handler would (per row: the pixel sum in
    every one of 10 columns) once released, or with ``status`` when set."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.release = asyncio.Event()
        self.status: int | None = None

    async def __call__(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> bytes:
        split = int(headers["inference-header-content-length"])
        header = json.loads(body[:split])
        shape = header["inputs"][0]["shape"]
        pixels = np.frombuffer(body[split:], dtype="<f4").reshape(shape)
        self.rows.append(shape[0])
        await self.release.wait()
        if self.status is not None:
            doc = json.dumps({"code": self.status, "type": "InternalServerError",
                              "message": "Worker died."}).encode()  # fmt: skip
            return ok(doc).replace(b"200 OK", f"{self.status} Oops".encode(), 1)
        sums = pixels.reshape(shape[0], -1).sum(axis=1)
        data = np.repeat(sums[:, None], 10, axis=1)
        doc = {"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [shape[0], 10],
                            "data": data.ravel().tolist()}]}  # fmt: skip
        return ok(json.dumps(doc).encode(), "Content-Type: application/json")


def _gateway_config(url: str, coalesce: dict[str, Any] | None) -> dict[str, Any]:
    backend: dict[str, Any] = {"kind": "torchserve", "url": url, "retries": 0}
    if coalesce is not None:
        backend["coalesce"] = coalesce
    return {
        "backends": {"ts": backend},
        "models": {"digits": {**DIGITS_IO, "routes": [{"backend": "ts", "framework": "pytorch"}]}},
    }


def _body(seed: int, rows: int) -> dict[str, Any]:
    pixels = seed * 1000 + np.arange(rows * 64, dtype=np.float32)
    return {"inputs": [{"name": "pixels", "shape": [rows, 8, 8], "datatype": "FP32",
                        "data": pixels.tolist()}]}  # fmt: skip


async def _queued(app: Any, count: int) -> None:
    backend = app.state.gateway.dataplane.backends["ts"]

    def waiting() -> bool:
        groups = backend.coalescer._groups.values()
        return sum(len(g.queue) for g in groups) == count

    await eventually(waiting, f"{count} requests queued behind the call in flight")


async def test_through_the_gateway_each_client_gets_its_own_rows(gateway: GatewayFactory) -> None:
    fake = ScriptedTorchServe()
    async with scripted(fake) as (_, url):
        config = _gateway_config(url, {"max_calls_in_flight": 1, "max_batch_size": 64})
        async with gateway(config) as (client, app):
            sizes = [1, 2, 1, 3, 1, 1, 4, 2]
            tasks = [
                asyncio.create_task(client.post("/v2/models/digits/infer", json=_body(i, n)))
                for i, n in enumerate(sizes)
            ]
            await eventually(lambda: len(fake.rows) == 1, "the first call reached TorchServe")
            await _queued(app, len(sizes) - 1)
            fake.release.set()
            replies = await asyncio.gather(*tasks)
            assert fake.rows == [sizes[0], sum(sizes[1:])]  # two calls for eight requests
            for i, (n, reply) in enumerate(zip(sizes, replies, strict=True)):
                assert reply.status_code == 200, reply.text
                output = reply.json()["outputs"][0]
                assert output["shape"] == [n, 10]
                pixels = i * 1000 + np.arange(n * 64, dtype=np.float32)
                sums = pixels.reshape(n, -1).sum(axis=1)
                np.testing.assert_allclose(np.array(output["data"]).reshape(n, 10)[:, 0], sums)
            registry = app.state.gateway.metrics.registry
            labels = {"backend": "ts"}
            assert registry.get_sample_value("duoserve_backend_batch_rows_count", labels) == 2
            assert registry.get_sample_value("duoserve_backend_batch_rows_sum", labels) == 15
            # Per-request metrics stay per request.
            requests = registry.get_sample_value(
                "duoserve_requests_total",
                {"model": "digits", "framework": "pytorch", "backend": "ts", "protocol": "v2",
                 "code": "200"},
            )  # fmt: skip
            assert requests == len(sizes)


async def test_through_the_gateway_a_failed_combined_call_is_every_clients_5xx(
    gateway: GatewayFactory,
) -> None:
    fake = ScriptedTorchServe()
    fake.status = 500
    async with scripted(fake) as (_, url):
        config = _gateway_config(url, {"max_calls_in_flight": 1})
        async with gateway(config) as (client, app):
            tasks = [
                asyncio.create_task(client.post("/v2/models/digits/infer", json=_body(i, 1)))
                for i in range(5)
            ]
            await eventually(lambda: len(fake.rows) == 1, "the first call reached TorchServe")
            await _queued(app, 4)
            fake.release.set()
            replies = await asyncio.gather(*tasks)
            assert fake.rows == [1, 4]
            for reply in replies:
                assert reply.status_code == 502, reply.text
                assert set(reply.json()) == {"error"}
                assert "TorchServe" in reply.json()["error"]
            registry = app.state.gateway.metrics.registry
            errors = registry.get_sample_value(
                "duoserve_backend_errors_total",
                {"model": "digits", "backend": "ts", "framework": "pytorch",
                 "reason": "backend_error"},
            )  # fmt: skip
            assert errors == 5  # one per request, as without coalescing


async def test_a_v2_backend_coalesces_the_same_way(gateway: GatewayFactory) -> None:
    """The code sits above each backend's own call: a kind: v2 backend (V2 JSON here) gets one
    combined call for the requests queued behind its call in flight."""
    rows: list[int] = []
    release = asyncio.Event()

    async def v2_server(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        doc = json.loads(body)
        shape = doc["inputs"][0]["shape"]
        rows.append(shape[0])
        await release.wait()
        pixels = np.array(doc["inputs"][0]["data"], dtype=np.float32).reshape(shape)
        sums = pixels.reshape(shape[0], -1).sum(axis=1)
        data = np.repeat(sums[:, None], 10, axis=1)
        answer = {"model_name": "digits", "outputs": [{"name": "probabilities", "datatype": "FP32",
                  "shape": [shape[0], 10], "data": data.ravel().tolist()}]}  # fmt: skip
        return ok(json.dumps(answer).encode(), "Content-Type: application/json")

    async with scripted(v2_server) as (_, url):
        backend = {"kind": "v2", "url": url, "binary_tensors": False, "retries": 0,
                   "coalesce": {"max_calls_in_flight": 1}}  # fmt: skip
        routes = [{"backend": "ts", "framework": "pytorch"}]
        config = {
            "backends": {"ts": backend},
            "models": {"digits": {**DIGITS_IO, "routes": routes}},
        }
        async with gateway(config) as (client, app):
            sizes = [1, 2, 1, 3]
            tasks = [
                asyncio.create_task(client.post("/v2/models/digits/infer", json=_body(i, n)))
                for i, n in enumerate(sizes)
            ]
            await eventually(lambda: len(rows) == 1, "the first call reached the V2 server")
            await _queued(app, len(sizes) - 1)
            release.set()
            replies = await asyncio.gather(*tasks)
            assert rows == [1, 6]
            for i, (n, reply) in enumerate(zip(sizes, replies, strict=True)):
                assert reply.status_code == 200, reply.text
                pixels = i * 1000 + np.arange(n * 64, dtype=np.float32)
                sums = pixels.reshape(n, -1).sum(axis=1)
                output = np.array(reply.json()["outputs"][0]["data"]).reshape(n, 10)
                np.testing.assert_allclose(output[:, 0], sums)
