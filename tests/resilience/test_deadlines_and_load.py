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
from tests.servers import http_get, wait_until
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
    backend_s = 4.0
    slow.set_delay(backend_s * 1000)
    async with gateway(config(slow, timeout_ms=10_000)) as (client, _):
        cases = [
            ({}, 0.6),  # the model's timeout_ms
            ({"x-duoserve-timeout-ms": "200"}, 0.2),  # lowered by the client
            ({"x-duoserve-timeout-ms": "60000"}, 0.6),  # never raised
            ({"parameters": {"timeout": 150_000}}, 0.15),  # V2's own, in microseconds
        ]
        for extra, deadline_s in cases:
            headers = {k: v for k, v in extra.items() if k != "parameters"}
            body = v2_body(IMAGE, **{k: v for k, v in extra.items() if k == "parameters"})
            started = time.perf_counter()
            answer = await client.post(INFER, json=body, headers=headers)
            took = time.perf_counter() - started
            print(f"deadline {deadline_s * 1000:.0f} ms: 504 after {took * 1000:.0f} ms")
            assert answer.status_code == 504, answer.text
            # The deadline that applied, by its own words, and kept: not before it, and not
            # at the backend's 4 s pace.
            assert f"{deadline_s * 1000:.0f} ms" in answer.json()["error"], answer.text
            assert deadline_s * 0.9 <= took < backend_s
    slow.set_delay(0)


async def test_overload_sheds_with_503_and_retry_after_in_milliseconds(
    gateway: GatewayFactory, slow: StandinHandle
) -> None:
    slow.set_delay(400)
    cfg = config(slow, max_concurrency=1, max_queue=1)
    cfg["models"]["digits"]["timeout_ms"] = 5000  # type: ignore[index]
    async with gateway(cfg) as (client, app):

        started = time.perf_counter()

        async def one() -> tuple[int, float, dict[str, str]]:
            answer = await client.post(INFER, json=v2_body(IMAGE))
            return answer.status_code, time.perf_counter() - started, dict(answer.headers)

        results = await asyncio.gather(*(one() for _ in range(12)))
        ok = [r for r in results if r[0] == 200]
        shed = [r for r in results if r[0] == 503]
        assert len(ok) == 2 and len(shed) == 10, [r[0] for r in results]  # 1 running + 1 queued
        assert all(r[2]["retry-after"] == "1" for r in shed)
        worst = max(r[1] for r in shed)
        print(f"overload: 10 shed, slowest 503 after {worst * 1000:.1f} ms")
        # Nobody waited for the backend: every 503 was out before the first answer, which
        # took the backend's 400 ms.
        assert worst < min(r[1] for r in ok)
        metrics = (await client.get("/metrics")).text
        assert 'duoserve_shed_requests_total{model="digits",reason="backend_concurrency"} 10.0' in (
            metrics
        )


def _in_flight(metrics: str) -> float:
    match = re.search(r'duoserve_backend_requests_in_flight\{backend="tfs"[^}]*\} (\S+)', metrics)
    return float(match.group(1)) if match else 0.0


def _backend_calls_completed(metrics: str) -> float:
    pattern = r'duoserve_backend_request_duration_seconds_count\{[^}]*backend="tfs"[^}]*\} (\S+)'
    return sum(float(v) for v in re.findall(pattern, metrics))


def test_client_disconnect_cancels_the_backend_call(tmp_path: Path, slow: StandinHandle) -> None:
    """Over a real socket (uvicorn): the slot is free again long before the backend would answer."""
    slow.set_delay(3000)
    cfg = config(slow, max_concurrency=1, max_queue=0, timeout_ms=10_000)
    cfg["models"]["digits"]["timeout_ms"] = 10_000  # type: ignore[index]
    server = None
    try:
        server = start_gateway(tmp_path, cfg)
        body = orjson.dumps(v2_body(IMAGE))
        request = (
            f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"x-duoserve-timeout-ms: 10000\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        def metrics() -> str:
            return http_get(server.url + "/metrics")[1].decode()

        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
            wait_until(lambda: _in_flight(metrics()) == 1, 10, "the backend call in flight")
        left = time.perf_counter()
        wait_until(lambda: _in_flight(metrics()) == 0, 30, "the backend call ended")
        freed_ms = (time.perf_counter() - left) * 1000
        print(f"backend call ended {freed_ms:.0f} ms after the client left")
        # Cancelled, not completed: a backend call that ran to its answer (the stand-in's 3 s)
        # would be counted in the backend latency histogram ...
        assert _backend_calls_completed(metrics()) == 0
        # ... as one that does is.
        slow.set_delay(0)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert _backend_calls_completed(metrics()) == 1
    finally:
        if server is not None:
            server.stop()
