"""Prometheus metrics after real requests, on each app's own registry, and /metrics itself."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
import pytest

from tests.conftest import GatewayFactory, v2_body

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

IMAGES = (np.arange(4 * 64, dtype=np.float32) % 17).reshape(4, 8, 8)
JSON = {"content-type": "application/json"}


def _value(app: Any, name: str, **labels: str) -> float | None:
    value: float | None = app.state.gateway.metrics.registry.get_sample_value(name, labels)
    return value


def _total(app: Any, name: str) -> float:
    """Sum of every sample called ``name``, whatever its labels."""
    return sum(
        s.value
        for metric in app.state.gateway.metrics.registry.collect()
        for s in metric.samples
        if s.name == name
    )


async def test_requests_are_counted_per_framework_protocol_and_code(
    gateway: GatewayFactory,
) -> None:
    v2 = orjson.dumps(v2_body(IMAGES))
    tfs = orjson.dumps({"instances": IMAGES[:2].tolist()})
    bad = orjson.dumps({"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32"}]})
    async with gateway() as (client, app):
        for _ in range(3):
            answer = await client.post("/v2/models/digits-pytorch/infer", content=v2, headers=JSON)
            assert answer.status_code == 200
        for _ in range(2):
            ok = await client.post(
                "/v1/models/digits-tensorflow:predict", content=tfs, headers=JSON
            )
            assert ok.status_code == 200
        ok = await client.post("/predictions/digits-pytorch", json=IMAGES[:1].tolist())
        assert ok.status_code == 200
        pinned = await client.post(
            "/v2/models/digits/infer",
            content=v2,
            headers={**JSON, "x-duoserve-framework": "tensorflow"},
        )
        assert pinned.status_code == 200
        invalid = await client.post("/v2/models/digits-pytorch/infer", content=bad, headers=JSON)
        assert invalid.status_code == 400
        unknown = await client.post("/v2/models/no-such-model/infer", content=v2, headers=JSON)
        assert unknown.status_code == 404

        def requests(model: str, framework: str, backend: str, protocol: str, code: str) -> Any:
            return _value(
                app,
                "duoserve_requests_total",
                model=model,
                framework=framework,
                backend=backend,
                protocol=protocol,
                code=code,
            )

        assert requests("digits-pytorch", "pytorch", "local", "v2", "200") == 3
        assert requests("digits-tensorflow", "tensorflow", "local", "tfserving", "200") == 2
        assert requests("digits-pytorch", "pytorch", "local", "torchserve", "200") == 1
        assert requests("digits", "tensorflow", "local", "v2", "200") == 1
        assert requests("digits", "pytorch", "local", "v2", "200") is None
        # Refused before any backend: no framework served it.
        assert requests("digits-pytorch", "none", "none", "v2", "400") == 1
        # Unknown model names are folded into one label value (no cardinality explosion).
        assert requests("unknown", "none", "none", "v2", "404") == 1
        assert _total(app, "duoserve_requests_total") == 9

        # Rows inferred, for samples per second.
        assert (
            _value(
                app, "duoserve_inferred_items_total", model="digits-pytorch", framework="pytorch"
            )
            == 3 * 4 + 1
        )
        assert (
            _value(
                app,
                "duoserve_inferred_items_total",
                model="digits-tensorflow",
                framework="tensorflow",
            )
            == 2 * 2
        )

        # Latency: every answered request in the gateway histogram, every successful backend
        # call in the backend histogram.
        assert (
            _value(
                app,
                "duoserve_request_duration_seconds_count",
                model="digits-pytorch",
                framework="pytorch",
                protocol="v2",
            )
            == 3
        )
        assert (
            _value(
                app,
                "duoserve_request_duration_seconds_count",
                model="unknown",
                framework="none",
                protocol="v2",
            )
            == 1
        )
        assert (
            _value(
                app,
                "duoserve_backend_request_duration_seconds_count",
                model="digits-pytorch",
                framework="pytorch",
                backend="local",
            )
            == 4
        )
        assert (
            _value(
                app,
                "duoserve_backend_request_duration_seconds_sum",
                model="digits-pytorch",
                framework="pytorch",
                backend="local",
            )
            > 0
        )

        # Sizes of what went in and out.
        assert _value(app, "duoserve_request_size_bytes_count", protocol="tfserving") == 2
        assert _value(app, "duoserve_request_size_bytes_sum", protocol="tfserving") == 2 * len(tfs)
        assert _value(app, "duoserve_response_size_bytes_count", protocol="v2") == 6
        assert _value(app, "duoserve_response_size_bytes_sum", protocol="v2") > 4 * len(
            answer.content
        )

        # Nothing is left in flight.
        for protocol in ("v2", "tfserving", "torchserve"):
            assert _value(app, "duoserve_requests_in_flight", protocol=protocol) == 0
        assert (
            _value(app, "duoserve_backend_requests_in_flight", backend="local", framework="pytorch")
            == 0
        )


async def test_health_and_metrics_requests_are_not_counted(gateway: GatewayFactory) -> None:
    async with gateway() as (client, app):
        for path in (
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models",
            "/v2/models/digits",
            "/v2/models/digits/ready",
            "/v1/models/digits",
            "/v1/models/digits/metadata",
            "/ping",
            "/metrics",
            "/metrics",
        ):
            response = await client.get(path)
            assert response.status_code == 200, path
        assert _total(app, "duoserve_requests_total") == 0
        assert _total(app, "duoserve_request_duration_seconds_count") == 0
        assert _total(app, "duoserve_request_size_bytes_count") == 0


async def test_each_app_has_its_own_registry(gateway: GatewayFactory) -> None:
    async with gateway() as (client, first):
        await client.post("/v2/models/digits-pytorch/infer", json=v2_body(IMAGES[:1]))
    async with gateway() as (_, second):
        assert _total(first, "duoserve_requests_total") == 1
        assert _total(second, "duoserve_requests_total") == 0


async def test_backend_up_and_circuit_state_at_start(gateway: GatewayFactory) -> None:
    async with gateway() as (_, app):
        for _ in range(50):  # the probe runs as soon as the app has started
            if _value(app, "duoserve_backend_up", backend="local", framework="tensorflow"):
                break
            await asyncio.sleep(0.02)
        assert _value(app, "duoserve_backend_up", backend="local", framework="pytorch") == 1
        assert _value(app, "duoserve_backend_up", backend="local", framework="tensorflow") == 1
        assert _value(app, "duoserve_circuit_state", backend="local") == 0


async def test_metrics_endpoint_text_format(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        await client.post("/v2/models/digits-pytorch/infer", json=v2_body(IMAGES[:1]))
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        lines = response.text.splitlines()
        assert "# TYPE duoserve_requests_total counter" in lines
        assert (
            'duoserve_requests_total{backend="local",code="200",framework="pytorch",'
            'model="digits-pytorch",protocol="v2"} 1.0'
        ) in lines
        assert "# TYPE duoserve_request_duration_seconds histogram" in lines
        assert not response.text.rstrip().endswith("# EOF")


async def test_metrics_endpoint_openmetrics_when_asked(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        await client.post("/v2/models/digits-pytorch/infer", json=v2_body(IMAGES[:1]))
        response = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.endswith("# EOF\n")
        lines = response.text.splitlines()
        # OpenMetrics names the counter family without _total, its samples with it.
        assert "# TYPE duoserve_requests counter" in lines
        assert any(
            line.startswith("duoserve_requests_total{") and 'model="digits-pytorch"' in line
            for line in lines
        )


def _exposition(registry: Any, openmetrics: bool) -> list[str]:
    from prometheus_client import exposition
    from prometheus_client import openmetrics as om

    text = (om.exposition.generate_latest if openmetrics else exposition.generate_latest)(registry)
    # _created holds each child's creation time: equal in shape, not in value.
    return [line for line in text.decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("openmetrics", [False, True])
def test_loop_metrics_expose_exactly_what_prometheus_client_does(openmetrics: bool) -> None:
    """The gateway's lock-free metrics must look the same to Prometheus and the dashboards."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from duoserve.metrics import LATENCY_BUCKETS, LoopCounter, LoopGauge, LoopHistogram

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    pairs = [
        (
            Histogram("t_seconds", "Latency.", ["model"], buckets=LATENCY_BUCKETS, registry=theirs),
            LoopHistogram("t_seconds", "Latency.", ["model"], ours, buckets=LATENCY_BUCKETS),
        ),
        (
            Counter("t_requests", "Requests.", ["model", "code"], registry=theirs),
            LoopCounter("t_requests", "Requests.", ["model", "code"], ours),
        ),
        (
            Gauge("t_in_flight", "In flight.", ["protocol"], registry=theirs),
            LoopGauge("t_in_flight", "In flight.", ["protocol"], ours),
        ),
    ]
    rng = np.random.default_rng(0)
    # Bucket edges exactly, below the first, beyond the last, and a spread in between.
    samples = [*LATENCY_BUCKETS, 0.0, 1e-6, 11.0, *rng.exponential(0.01, 300).tolist()]
    for metric in pairs[0]:
        for i, value in enumerate(samples):
            metric.labels("a" if i % 3 else "b").observe(value)
    for metric in pairs[1]:
        metric.labels("a", "200").inc()
        metric.labels("a", "200").inc(4)
        metric.labels("b", "503").inc(0)
    for metric in pairs[2]:
        metric.labels("v2").inc()
        metric.labels("v2").inc(2)
        metric.labels("v2").dec()
        metric.labels("torchserve").set(7)
    assert _exposition(ours, openmetrics) == _exposition(theirs, openmetrics)
    with pytest.raises(ValueError):
        pairs[1][1].labels("a", "200").inc(-1)
    with pytest.raises(ValueError):
        pairs[1][1].labels("only-one")
