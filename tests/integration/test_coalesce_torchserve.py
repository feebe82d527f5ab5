"""Coalescing against a real TorchServe: concurrent requests reach it as fewer calls (its own
metrics API counts them), each client gets exactly the rows an uncoalesced call gives it, and
without ``coalesce`` every request stays its own call."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from tests.conftest import DIGITS_IO, GatewayFactory, v2_body
from tests.servers import TorchServe

pytestmark = pytest.mark.integration

SIZES = [1, 2, 1, 3, 1, 1, 2, 1, 4, 1, 1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 2, 1, 1, 3]


def _config(torchserve: TorchServe, coalesce: dict[str, Any] | None) -> dict[str, Any]:
    backend: dict[str, Any] = {
        "kind": "torchserve",
        "url": torchserve.url,
        "token_file": str(torchserve.key_file),
    }
    if coalesce is not None:
        backend["coalesce"] = coalesce
    routes = [{"backend": "torchserve", "framework": "pytorch", "model": "digits"}]
    return {
        "backends": {"torchserve": backend},
        "models": {"digits": {**DIGITS_IO, "routes": routes}},
    }


def _bodies(images: np.ndarray) -> list[dict[str, Any]]:
    bodies, start = [], 0
    for rows in SIZES:
        bodies.append(v2_body(images[start : start + rows]))
        start += rows
    return bodies


async def _all_at_once(client: Any, bodies: list[dict[str, Any]]) -> list[np.ndarray]:
    replies = await asyncio.gather(
        *(client.post("/v2/models/digits/infer", json=body) for body in bodies)
    )
    outputs = []
    for reply, rows in zip(replies, SIZES, strict=True):
        assert reply.status_code == 200, reply.text
        output = reply.json()["outputs"][0]
        assert output["shape"] == [rows, 10]
        outputs.append(np.array(output["data"], dtype=np.float32).reshape(rows, 10))
    return outputs


def _batch_rows(app: Any) -> tuple[float | None, float | None]:
    registry = app.state.gateway.metrics.registry
    labels = {"backend": "torchserve"}
    return (
        registry.get_sample_value("duoserve_backend_batch_rows_count", labels),
        registry.get_sample_value("duoserve_backend_batch_rows_sum", labels),
    )


async def test_concurrent_requests_reach_torchserve_as_fewer_calls_with_their_own_answers(
    gateway: GatewayFactory, torchserve: TorchServe, digits_samples: Any
) -> None:
    images, labels = digits_samples
    bodies = _bodies(images)

    # Uncoalesced, one request after another: the answers to compare with.
    async with gateway(_config(torchserve, None)) as (client, app):
        before = await asyncio.to_thread(torchserve.inference_count)
        alone = []
        for body, rows in zip(bodies, SIZES, strict=True):
            reply = await client.post("/v2/models/digits/infer", json=body)
            assert reply.status_code == 200, reply.text
            alone.append(np.array(reply.json()["outputs"][0]["data"]).reshape(rows, 10))
        assert await asyncio.to_thread(torchserve.inference_count) - before == len(SIZES)

        # Off by default: all at once, still one call per request, and no batch-rows series.
        before = await asyncio.to_thread(torchserve.inference_count)
        await _all_at_once(client, bodies)
        assert await asyncio.to_thread(torchserve.inference_count) - before == len(SIZES)
        assert _batch_rows(app) == (None, None)

    async with gateway(_config(torchserve, {"max_calls_in_flight": 1})) as (client, app):
        before = await asyncio.to_thread(torchserve.inference_count)
        combined = await _all_at_once(client, bodies)
        calls = await asyncio.to_thread(torchserve.inference_count) - before
        assert calls < len(SIZES), "no requests were combined"
        assert _batch_rows(app) == (calls, sum(SIZES))
    for got, expected in zip(combined, alone, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    predicted = np.concatenate([output.argmax(axis=1) for output in combined])
    assert (predicted == labels[: sum(SIZES)]).mean() > 0.9


async def test_an_error_of_a_combined_call_reaches_each_request_as_its_own_json_error(
    gateway: GatewayFactory, torchserve: TorchServe, digits_samples: Any
) -> None:
    """TorchServe refuses a version it does not have (404) for the whole combined call."""
    images, _ = digits_samples
    config = _config(torchserve, {"max_calls_in_flight": 1})
    config["models"]["digits"]["routes"][0]["version"] = "7"
    async with gateway(config) as (client, app):
        body = [v2_body(images[i : i + 1]) for i in range(8)]
        replies = await asyncio.gather(
            *(client.post("/v2/models/digits/infer", json=b) for b in body)
        )
        for reply in replies:
            assert reply.status_code == 404, reply.text
            assert set(reply.json()) == {"error"}
        calls, rows = _batch_rows(app)
        assert rows == 8
        assert calls is not None and calls <= 8
