"""Error bodies never leak internals: every backend failure (refused connection on each backend
kind, timeout, open circuit) answers without addresses, backend ports, file paths or traces."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import GatewayFactory, v2_body
from tests.resilience.conftest import digits
from tests.servers import free_port
from tests.tfserving_standin.fixture import StandinHandle

pytestmark = pytest.mark.integration

IMAGE = (np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)
TOKEN = "secret-torchserve-token-123"


@pytest.fixture
def slow(standin: StandinHandle) -> Iterator[StandinHandle]:
    standin.set_delay(3000)
    yield standin
    standin.set_delay(0)


def _model(backend: str) -> dict[str, object]:
    return digits([{"backend": backend, "framework": "pytorch", "model": "digits"}], timeout_ms=400)


async def test_backend_failures_leak_nothing(
    gateway: GatewayFactory, slow: StandinHandle, tmp_path: Path
) -> None:
    dead = free_port()
    token_file = tmp_path / "key_file.json"
    token_file.write_text(TOKEN)
    config = {
        "backends": {
            "ts": {
                "kind": "torchserve",
                "url": f"http://127.0.0.1:{dead}",
                "token_file": str(token_file),
            },
            "tfs-grpc": {"kind": "tfserving", "grpc": f"127.0.0.1:{dead}"},
            "tfs-rest": {
                "kind": "tfserving",
                "protocol": "rest",
                "url": f"http://127.0.0.1:{dead}",
            },
            "v2": {"kind": "v2", "url": f"http://127.0.0.1:{dead}"},
            "slow": {"kind": "tfserving", "grpc": slow.grpc_address, "url": slow.rest_url},
            "slow-rest": {"kind": "tfserving", "protocol": "rest", "url": slow.rest_url},
        },
        "models": {
            name: _model(name) for name in ("ts", "tfs-grpc", "tfs-rest", "v2", "slow", "slow-rest")
        },
    }
    forbidden = [
        "127.0.0.1",
        "localhost",
        str(dead),
        str(slow.grpc_port),
        str(slow.rest_port),
        "/tmp",
        str(tmp_path),
        "Traceback",
        'File "',
        TOKEN,
    ]
    seen: dict[str, set[int]] = {}
    async with gateway(config, circuit_failure_threshold=2) as (client, _):
        for model in config["models"]:
            for path, body in [
                (f"/v2/models/{model}/infer", v2_body(IMAGE)),
                (f"/v1/models/{model}:predict", {"instances": IMAGE.tolist()}),
                (f"/predictions/{model}", IMAGE.tolist()),
            ]:
                # Three calls: the failure itself, then (threshold 2) the open circuit.
                for _ in range(3):
                    answer = await client.post(path, json=body)
                    seen.setdefault(model, set()).add(answer.status_code)
                    assert answer.status_code in (502, 503, 504), (path, answer.text)
                    # The request id is random hex: it may contain a port's digits by chance,
                    # and being 32 hex digits it cannot carry anything else.
                    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
                    for word in forbidden:
                        assert word not in answer.text, (path, word, answer.text)
                        for name, value in answer.headers.items():
                            if name != "x-request-id":
                                assert word not in value, (path, name, value)
    print("statuses:", seen)
    assert seen["slow"] >= {504} and seen["ts"] >= {503}
