"""Deadlines (504 at the deadline, not at the backend's pace), load shedding (503 + Retry-After
in milliseconds) and cancellation of the backend call when the client leaves, against the TF
Serving stand-in made slow on purpose."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.conftest import GatewayFactory, v2_body
from tests.resilience.conftest import digits, start_gateway, tfs_backend
from tests.servers import http_get
from tests.tfserving_standin.fixture import StandinHandle

pytestmark = pytest.mark.integration

IMAGE = (np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)
INFER = "/v2/models/digits/infer"


@pytest.fixture
def slow(standin: StandinHandle) -> Iterator[StandinHandle]:
    yield standin
    standin.set_delay(0)


def config(handle: StandinHandle, **backend: int) -> dict[str, object]:
    return {
        "backends": {"tfs": tfs_backend(handle, **backend)},
        "models": {
            "digits": digits(
                [{"backend": "tfs", "framework": "tensorflow", "model": "digits"}], timeout_ms=600
            )
        },
    }


async def test_a_slow_backend_answers_504_at_the_deadline(
    gateway: GatewayFactory, slow: StandinHandle
) -> None:
    slow.set_delay(4000)
    async with gateway(config(slow, timeout_ms=10_000)) as (client, _):
        cases = [
            ({}, 0.6),  # the model's timeout_ms
            ({"x-duoserve-timeout-ms": "200"}, 0.2),  # lowered by the client
            ({"x-duoserve-timeout-ms": "60000"}, 0.6),  # never raised
        ]
        for headers, deadline_s in cases:
            started = time.perf_counter()
            answer = await client.post(INFER, json=v2_body(IMAGE), headers=headers)
            took = time.perf_counter() - started
            print(f"deadline {deadline_s * 1000:.0f} ms: 504 after {took * 1000:.0f} ms")
            assert answer.status_code == 504, answer.text
            assert "deadline" in answer.json()["error"]
            assert deadline_s * 0.9 <= took < deadline_s + 1.0
        # V2's own `timeout` parameter (microseconds) lowers it too.
        started = time.perf_counter()
        answer = await client.post(INFER, json=v2_body(IMAGE, parameters={"timeout": 150_000}))
        assert answer.status_code == 504 and time.perf_counter() - started < 1.15
    slow.set_delay(0)


async def test_overload_sheds_with_503_and_retry_after_in_milliseconds(
    gateway: GatewayFactory, slow: StandinHandle
) -> None:
    slow.set_delay(400)
    cfg = config(slow, max_concurrency=1, max_queue=1)
    cfg["models"]["digits"]["timeout_ms"] = 5000  # type: ignore[index]
    async with gateway(cfg) as (client, app):

        async def one() -> tuple[int, float, dict[str, str]]:
            started = time.perf_counter()
            answer = await client.post(INFER, json=v2_body(IMAGE))
            return answer.status_code, time.perf_counter() - started, dict(answer.headers)

        results = await asyncio.gather(*(one() for _ in range(12)))
        ok = [r for r in results if r[0] == 200]
        shed = [r for r in results if r[0] == 503]
        assert len(ok) == 2 and len(shed) == 10, [r[0] for r in results]  # 1 running + 1 queued
        assert all(r[2]["retry-after"] == "1" for r in shed)
        worst = max(r[1] for r in shed)
        print(f"overload: 10 shed, slowest 503 after {worst * 1000:.1f} ms")
        assert worst < 0.2  # the backend takes 400 ms: nobody waited for it
        metrics = (await client.get("/metrics")).text
        assert 'duoserve_shed_requests_total{model="digits",reason="backend_concurrency"} 10.0' in (
            metrics
        )


def _in_flight(metrics: str) -> float:
    match = re.search(r'duoserve_backend_requests_in_flight\{backend="tfs"[^}]*\} (\S+)', metrics)
    return float(match.group(1)) if match else 0.0


def test_client_disconnect_cancels_the_backend_call(tmp_path: Path, slow: StandinHandle) -> None:
    """Over a real socket (uvicorn): the slot is free again long before the backend would answer."""
    slow.set_delay(3000)
    cfg = config(slow, max_concurrency=1, max_queue=0, timeout_ms=10_000)
    cfg["models"]["digits"]["timeout_ms"] = 10_000  # type: ignore[index]
    server = start_gateway(tmp_path, cfg)
    try:
        body = orjson.dumps(v2_body(IMAGE))
        request = (
            f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"x-duoserve-timeout-ms: 10000\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
            time.sleep(0.3)
            assert _in_flight(http_get(server.url + "/metrics")[1].decode()) == 1
        left = time.perf_counter()
        while _in_flight(http_get(server.url + "/metrics")[1].decode()) and (
            time.perf_counter() - left < 5
        ):
            time.sleep(0.05)
        freed = time.perf_counter() - left
        print(f"backend call cancelled {freed * 1000:.0f} ms after the client left")
        assert freed < 1.0  # the stand-in would have taken 2.7 s more
    finally:
        server.stop()
