"""Gated rollouts against real servers: TorchServe (real) as the current route, TF Serving
stand-ins as targets; a target that disagrees, fails mid-rollout or is slower is rolled back by
its gates, and users never see the disagreeing one. Two gateway replicas reading the gates from
one real Prometheus take the same decisions at the same moments."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import DIGITS_IO
from tests.prometheus_fixture import start_prometheus
from tests.servers import Gateway, TorchServe, http_get
from tests.tfserving_standin.fixture import StandinHandle, start_standin, write_model_config
from tests.timing import eventually
from tests.traffic import Traffic, gateway_from_file

pytestmark = pytest.mark.integration


def rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@pytest.fixture(scope="module")
def targets(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinHandle]:
    """A TF Serving stand-in serving `digits` and `digits-perturbed`: rollout targets."""
    store = model_store / "tensorflow"
    config = write_model_config(
        tmp_path_factory.mktemp("targets") / "models.config",
        {"digits": store / "digits", "digits-perturbed": store / "digits-perturbed"},
    )
    handle = start_standin(model_config_file=config)
    try:
        yield handle
    finally:
        handle.stop()


def backends(torchserve: TorchServe, target: StandinHandle) -> dict[str, Any]:
    return {
        "ts": {
            "kind": "torchserve",
            "url": torchserve.url,
            "token_file": str(torchserve.key_file),
            "timeout_ms": 5000,
        },
        "target": {"kind": "tfserving", "grpc": target.grpc_address, "timeout_ms": 5000},
    }


def model_with_rollout(rollout: dict[str, Any], failover: bool = True) -> dict[str, Any]:
    return {
        **DIGITS_IO,
        "routes": [{"backend": "ts", "framework": "pytorch", "model": "digits"}],
        "failover": failover,
        "rollout": rollout,
    }


def rollout(model: str = "digits", **extra: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "to": {"backend": "target", "framework": "tensorflow", "model": model},
        "start": rfc3339(time.time()),
        "shadow": {"sample": 1.0, "min_requests": 60},
        "steps": [20, 100],
        "step_interval_s": 2.0,
        "evaluate_interval_s": 0.5,
        # Stand-in and TorchServe differ in speed here: the latency gate has its own test.
        "gates": {"min_requests": 60, "max_p99_ratio": 50, "min_agreement": 0.99},
    }
    block.update(extra)
    return block


def status_of(app: Any) -> dict[str, Any]:
    result: dict[str, Any] = app.state.gateway.dataplane.rollout("digits").status()
    return result


async def roll(
    path: Path,
    data: dict[str, Any],
    images: np.ndarray,
    until: str,
    then: Any = None,
    linger_s: float = 0.0,
) -> tuple[dict[str, Any], Traffic]:
    """Run a gateway on ``data`` under traffic until its rollout reaches phase ``until`` (and
    ``linger_s`` longer)."""
    async with gateway_from_file(path, data) as (client, app):
        async with Traffic([client], images).running() as traffic:
            if then is not None:
                await then(app, traffic)
            await eventually(lambda: status_of(app)["phase"] == until, f"phase {until}", 90)
            await asyncio.sleep(linger_s)
        return status_of(app), traffic


async def test_a_disagreeing_target_never_answers_a_user(
    torchserve: TorchServe,
    targets: StandinHandle,
    tmp_path: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    data = {
        "backends": backends(torchserve, targets),
        "models": {"digits": model_with_rollout(rollout("digits-perturbed"))},
    }
    status, traffic = await roll(tmp_path / "m.yaml", data, digits_samples[0], "rolled_back")
    (decision,) = status["history"]
    assert decision["decision"] == "rollback"
    failed = {name for name, gate in decision["gates"].items() if gate["state"] == "failed"}
    assert failed & {"min_agreement", "max_abs_diff"}, decision
    assert set(traffic.frameworks()) == {"pytorch"}  # no user saw the target
    assert traffic.statuses() == {200}


async def test_a_slower_target_fails_the_latency_gate(
    tfserving: StandinHandle,
    targets: StandinHandle,
    tmp_path: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    """Current route and target are both TF Serving stand-ins, the target made three times as
    slow (15 ms and 45 ms before each prediction)."""
    block = rollout(gates={"min_requests": 60, "max_p99_ratio": 1.25, "min_agreement": 0.99})
    data = {
        "backends": {
            "tfs": {"kind": "tfserving", "grpc": tfserving.grpc_address, "timeout_ms": 5000},
            "target": {"kind": "tfserving", "grpc": targets.grpc_address, "timeout_ms": 5000},
        },
        "models": {
            "digits": {
                **model_with_rollout(block),
                "routes": [{"backend": "tfs", "framework": "tensorflow", "model": "digits"}],
            }
        },
    }
    tfserving.set_delay(15)
    targets.set_delay(45)
    try:
        status, traffic = await roll(tmp_path / "m.yaml", data, digits_samples[0], "rolled_back")
    finally:
        tfserving.set_delay(0)
        targets.set_delay(0)
    (decision,) = status["history"]
    gate = decision["gates"]["max_p99_ratio"]
    assert gate["state"] == "failed" and gate["value"] > gate["threshold"], gate
    assert "max_p99_ratio" in decision["reason"]
    # Users were served by the current route only (the target got copies).
    assert traffic.statuses() == {200}


async def test_a_target_that_dies_mid_rollout_is_rolled_back_within_an_evaluation(
    torchserve: TorchServe,
    model_store: Path,
    tmp_path: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    """Without failover, users see the dead target's errors: only its step's share of the
    requests, only until the next evaluation point."""
    doomed = start_standin(model_base_path=model_store / "tensorflow" / "digits")
    try:
        block = rollout(steps=[20, 100], step_interval_s=3.0)
        data = {
            "backends": backends(torchserve, doomed),
            "models": {"digits": model_with_rollout(block, failover=False)},
        }
        killed: list[float] = []
        share: list[float] = []  # the target's percent when it died

        async def kill_in_step(app: Any, traffic: Traffic) -> None:
            await eventually(lambda: status_of(app)["phase"] == "step", "the first step", 60)
            await eventually(
                lambda: traffic.frameworks().count("tensorflow") > 5,
                "users served by the target",
            )
            share.append(status_of(app)["target_weight"])
            doomed.kill()
            killed.append(time.time())

        status, traffic = await roll(
            tmp_path / "m.yaml",
            data,
            digits_samples[0],
            "rolled_back",
            then=kill_in_step,
            linger_s=1.5,
        )
    finally:
        doomed.stop()
    rollback = status["history"][-1]
    assert rollback["decision"] == "rollback"
    assert rollback["gates"]["max_error_ratio"]["state"] == "failed"
    # Rolled back at an evaluation point (0.5 s apart) no later than the second after the
    # errors began (the first may have fallen just before them, its numbers read just after).
    rolled_back_at = seconds(rollback["at"])
    assert killed[0] - 0.5 < rolled_back_at <= killed[0] + 0.5 + 0.5
    window = [a for a in traffic.served if killed[0] <= a.sent <= rolled_back_at]
    errors = sum(a.status != 200 for a in window)
    assert share == [20]
    assert errors <= share[0] / 100 * len(window) + 3, (errors, len(window))
    # Once the rollback has been taken (routing changed), every request is served.
    taken_at = seconds(rollback["taken_at"])
    assert rolled_back_at <= taken_at
    after = [a.status for a in traffic.served if a.sent > taken_at + 0.1]
    assert after and set(after) == {200}


def metric_value(url: str, name: str, **labels: str) -> float | None:
    text = http_get(url + "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_two_replicas_reading_one_prometheus_decide_alike(
    torchserve: TorchServe,
    targets: StandinHandle,
    tmp_path: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    replicas = [Gateway(tmp_path / "models.yaml", tmp_path) for _ in range(2)]
    prom = start_prometheus(
        tmp_path, {"duoserve-gateway": [f"127.0.0.1:{g.port}" for g in replicas]}
    )
    try:
        block = rollout(
            start=rfc3339(time.time() + 20),  # both replicas up and scraped by then
            step_interval_s=4.0,
            evaluate_interval_s=1.0,
            gates_from={"prometheus": prom.url, "settle_s": 2.5},
        )
        data = {
            "backends": backends(torchserve, targets),
            "models": {"digits": model_with_rollout(block)},
        }
        (tmp_path / "models.yaml").write_text(yaml.safe_dump(data))
        for replica in replicas:
            replica.start()

        async def drive() -> Traffic:
            async with httpx.AsyncClient(base_url=replicas[0].url, timeout=30) as one:
                async with httpx.AsyncClient(base_url=replicas[1].url, timeout=30) as two:
                    async with Traffic([one, two], digits_samples[0]).running() as traffic:
                        deadline = time.monotonic() + 120
                        while not all(
                            metric_value(r.url, "duoserve_rollout_phase", phase="done") == 1
                            for r in replicas
                        ):
                            assert time.monotonic() < deadline, "the rollout did not finish"
                            await asyncio.sleep(0.5)
                    return traffic

        traffic = asyncio.run(drive())
        histories = []
        for replica in replicas:
            status, body = http_get(replica.url + "/v2/models/digits/rollout")
            assert status == 200, body
            histories.append(yaml.safe_load(body)["history"])
    finally:
        for replica in replicas:
            replica.stop()
        prom.stop()
    decisions = [[(d["at"], d["decision"], d["step"]) for d in h] for h in histories]
    assert decisions[0] == decisions[1], decisions
    assert [d[1] for d in decisions[0]] == ["advance", "advance", "done"]
    assert traffic.statuses() == {200}
    counts = Counter(traffic.frameworks())
    assert counts["tensorflow"] > 0 and counts["pytorch"] > 0
