"""Traffic between the frameworks over real servers: split, stickiness, pinning, shadow,
compare, and failover when TorchServe stops mid-test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DIGITS_IO, v2_body
from tests.servers import TorchServe, free_port

pytestmark = pytest.mark.integration


def _config(torchserve: Any, model_store: Path, **digits: Any) -> dict[str, Any]:
    return {
        "backends": {
            "local": {"kind": "embedded", "model_store": str(model_store)},
            "torchserve": {
                "kind": "torchserve",
                "url": torchserve.url,
                "token_file": str(torchserve.key_file),
            },
        },
        "models": {"digits": {**DIGITS_IO, **digits}},
    }


SPLIT_ROUTES = [
    {"backend": "torchserve", "framework": "pytorch", "model": "digits", "weight": 80},
    {"backend": "local", "framework": "tensorflow", "model": "digits", "weight": 20},
]


async def test_weighted_split_sticky_keys_and_pinning(
    gateway: Any, torchserve: Any, model_store: Path, digits_samples: Any
) -> None:
    images, _ = digits_samples
    body = v2_body(images[:1])
    async with gateway(_config(torchserve, model_store, routes=SPLIT_ROUTES)) as (client, _):
        served = []
        for _ in range(300):
            response = await client.post("/v2/models/digits/infer", json=body)
            assert response.status_code == 200
            served.append(response.headers["x-duoserve-framework"])
        share = served.count("pytorch") / len(served)
        assert 0.72 <= share <= 0.88, share  # 80 % +- ~3.5 sigma at n=300

        # The same route key always lands on the same framework; many keys follow the weights.
        for key in ("user-1", "user-2", "user-3"):
            seen = set()
            for _ in range(10):
                response = await client.post(
                    "/v2/models/digits/infer", json=body, headers={"x-duoserve-route-key": key}
                )
                seen.add(response.headers["x-duoserve-framework"])
            assert len(seen) == 1, (key, seen)
        keyed = []
        for i in range(200):
            response = await client.post(
                "/v2/models/digits/infer", json=body, headers={"x-duoserve-route-key": f"k{i}"}
            )
            keyed.append(response.headers["x-duoserve-framework"])
        assert 0.7 <= keyed.count("pytorch") / len(keyed) <= 0.9

        for framework, backend in (("pytorch", "torchserve"), ("tensorflow", "local")):
            for _ in range(5):
                response = await client.post(
                    "/v2/models/digits/infer",
                    json=body,
                    headers={"x-duoserve-framework": framework},
                )
                assert response.status_code == 200
                assert response.headers["x-duoserve-framework"] == framework
                assert response.headers["x-duoserve-backend"] == backend
                timing = response.headers["server-timing"]
                assert "gateway;dur=" in timing and "backend;dur=" in timing
        response = await client.post(
            "/v2/models/digits/infer", json=body, headers={"x-duoserve-framework": "jax"}
        )
        assert response.status_code == 400
        assert "pytorch" in response.json()["error"]


async def test_compare_runs_both_frameworks_on_the_users_data(
    gateway: Any, torchserve: Any, model_store: Path, digits_samples: Any
) -> None:
    images, labels = digits_samples
    async with gateway(_config(torchserve, model_store, routes=SPLIT_ROUTES)) as (client, _):
        response = await client.post("/v2/models/digits/compare", json=v2_body(images[:64]))
        assert response.status_code == 200, response.text
        report = response.json()
    by_framework = {r["framework"]: r for r in report["results"]}
    assert set(by_framework) == {"pytorch", "tensorflow"}
    for result in by_framework.values():
        assert result["latency_ms"] > 0
        probabilities = np.array(result["outputs"][0]["data"]).reshape(64, 10)
        assert (probabilities.argmax(axis=1) == labels[:64]).mean() >= 0.95
    (pair,) = report["agreement"]
    assert pair["rows"] == 64 and pair["argmax_agree"] == 64
    assert pair["max_abs_diff"] < 1e-4


async def test_shadow_never_delays_or_fails_the_primary(
    gateway: Any, torchserve: Any, model_store: Path, digits_samples: Any, tfserving: Any
) -> None:
    images, _ = digits_samples
    body = v2_body(images[:4])
    primary = [{"backend": "torchserve", "framework": "pytorch", "model": "digits"}]
    slow = _config(
        torchserve,
        model_store,
        routes=primary,
        shadow={"backend": "slow", "framework": "tensorflow", "model": "digits"},
    )
    slow["backends"]["slow"] = {
        "kind": "tfserving",
        "protocol": "rest",
        "url": tfserving.rest_url,
        "timeout_ms": 10_000,
    }
    down = _config(
        torchserve,
        model_store,
        routes=primary,
        shadow={"backend": "down", "framework": "tensorflow", "model": "digits"},
    )
    down["backends"]["down"] = {"kind": "v2", "url": f"http://127.0.0.1:{free_port()}"}

    def shadows_done(app: Any) -> float:
        return sum(
            sample.value
            for family in app.state.gateway.metrics.registry.collect()
            if family.name == "duoserve_shadow_requests"
            for sample in family.samples
            if sample.name == "duoserve_shadow_requests_total"
        )

    tfserving.set_delay(3000)  # the shadow hangs for 3 s on every request
    try:
        async with gateway(slow) as (client, app):
            for answered in range(1, 6):
                response = await client.post("/v2/models/digits/infer", json=body)
                assert response.status_code == 200
                assert response.headers["x-duoserve-framework"] == "pytorch"
                # Each shadow starts once its primary is served: a primary that waited for
                # its shadow would leave as many shadows done as primaries answered.
                assert shadows_done(app) < answered
            await app.state.gateway.dataplane.wait_shadows()
            assert shadows_done(app) == 5  # all five shadows were sent, and counted when done
    finally:
        tfserving.set_delay(0)

    async with gateway(down) as (client, app):
        for _ in range(5):
            response = await client.post("/v2/models/digits/infer", json=body)
            assert response.status_code == 200
        await app.state.gateway.dataplane.wait_shadows()
        registry = app.state.gateway.metrics.registry
        failed = registry.get_sample_value(
            "duoserve_shadow_requests_total",
            {"model": "digits", "framework": "tensorflow", "code": "503"},
        )
        assert failed == 5


async def test_shadow_agreement_is_recorded(
    gateway: Any, torchserve: Any, model_store: Path, digits_samples: Any
) -> None:
    images, _ = digits_samples
    config = _config(
        torchserve,
        model_store,
        routes=[{"backend": "torchserve", "framework": "pytorch", "model": "digits"}],
        shadow={"backend": "local", "framework": "tensorflow", "model": "digits"},
    )
    async with gateway(config) as (client, app):
        for start in range(0, 40, 8):
            response = await client.post(
                "/v2/models/digits/infer", json=v2_body(images[start : start + 8])
            )
            assert response.status_code == 200
        await app.state.gateway.dataplane.wait_shadows()
        registry = app.state.gateway.metrics.registry
        labels = {"model": "digits", "framework": "tensorflow"}
        assert registry.get_sample_value("duoserve_shadow_compared_items_total", labels) == 40
        assert registry.get_sample_value("duoserve_shadow_disagreeing_items_total", labels) == 0
        assert registry.get_sample_value("duoserve_shadow_max_abs_diff_count", labels) == 5


async def test_failover_when_torchserve_stops_mid_test(
    gateway: Any, model_store: Path, digits_samples: Any, tmp_path: Path
) -> None:
    images, labels = digits_samples
    server = TorchServe(tmp_path, model_store / "torchserve", {"digits": {}})
    try:
        server.start()
        config = _config(
            server,
            model_store,
            routes=[
                {"backend": "torchserve", "framework": "pytorch", "model": "digits", "weight": 1},
                {"backend": "local", "framework": "tensorflow", "model": "digits", "weight": 0},
            ],
            failover=True,
        )
        async with gateway(config) as (client, app):
            body = v2_body(images[:8])
            response = await client.post("/v2/models/digits/infer", json=body)
            assert response.headers["x-duoserve-framework"] == "pytorch"

            await asyncio.to_thread(server.stop)
            frameworks = []
            # Handed over on the refused connection: waiting out the 2 s deadline first would
            # leave no time to fail over, and answer 504.
            for _ in range(20):
                response = await client.post("/v2/models/digits/infer", json=body)
                assert response.status_code == 200, response.text
                frameworks.append(response.headers["x-duoserve-framework"])
                output = np.array(response.json()["outputs"][0]["data"]).reshape(8, 10)
                assert (output.argmax(axis=1) == labels[:8]).all()
            assert set(frameworks) == {"tensorflow"}
            registry = app.state.gateway.metrics.registry
            assert (
                registry.get_sample_value(
                    "duoserve_failovers_total", {"model": "digits", "framework": "tensorflow"}
                )
                == 20
            )

            # Pinned to the stopped framework: no failover across frameworks, a fast 503.
            response = await client.post(
                "/v2/models/digits/infer", json=body, headers={"x-duoserve-framework": "pytorch"}
            )
            assert response.status_code == 503
            assert "pytorch" in response.json()["error"] or "TorchServe" in response.json()["error"]
            assert response.headers["retry-after"]
    finally:
        server.stop()
