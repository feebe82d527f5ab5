"""Live configuration: models.yaml changes reach a running gateway without a restart, under
load, with real TorchServe and the TF Serving stand-in behind it; a bad file changes nothing."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from duoserve.app import create_app
from duoserve.settings import Settings
from tests.conftest import DIGITS_IO, STORE, v2_body
from tests.servers import Gateway, TorchServe, http_get
from tests.timing import eventually
from tests.traffic import Traffic, gateway_from_file

pytestmark = pytest.mark.integration

PYTORCH_ROUTE = [{"backend": "local", "framework": "pytorch", "model": "digits"}]
BODY = orjson.dumps(v2_body(np.full((1, 8, 8), 8.0, dtype=np.float32)))


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def backends_of(torchserve: TorchServe, tfserving: Any) -> dict[str, Any]:
    return {
        "ts": {
            "kind": "torchserve",
            "url": torchserve.url,
            "token_file": str(torchserve.key_file),
            "timeout_ms": 5000,
        },
        "tfs": {"kind": "tfserving", "grpc": tfserving.grpc_address, "timeout_ms": 5000},
        "tfs-rest": {
            "kind": "tfserving",
            "protocol": "rest",
            "url": tfserving.rest_url,
            "timeout_ms": 5000,
        },
    }


def routes(**weights: float) -> list[dict[str, Any]]:
    frameworks = {"ts": "pytorch", "tfs": "tensorflow", "tfs-rest": "tensorflow"}
    return [
        {"backend": name, "framework": frameworks[name], "model": "digits", "weight": weight}
        for name, weight in weights.items()
    ]


def gateway_config(all_backends: dict[str, Any], **weights: float) -> dict[str, Any]:
    return {
        "backends": {name: all_backends[name] for name in weights},
        "models": {"digits": {**DIGITS_IO, "routes": routes(**weights), "failover": True}},
    }


def gateway(path: Path, data: dict[str, Any]) -> Any:
    return gateway_from_file(path, data, config_poll_s=0.05, drain_grace_s=10)


def write(path: Path, data: dict[str, Any] | str) -> None:
    """Replace the file as editors and config tools do: a new file renamed over the old."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    os.replace(tmp, path)


async def test_twenty_reloads_under_load_fail_no_request(
    torchserve: TorchServe,
    tfserving: Any,
    tmp_path: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    every = backends_of(torchserve, tfserving)
    path = tmp_path / "models.yaml"
    versions = [
        gateway_config(every, ts=80, tfs=20),
        gateway_config(every, ts=20, tfs=80),
        gateway_config(every, ts=50, tfs=50, **{"tfs-rest": 50}),  # a backend added
        gateway_config(every, ts=50, **{"tfs-rest": 50}),  # one removed
        gateway_config(every, tfs=100, **{"tfs-rest": 1}),
    ]
    async with gateway(path, versions[0]) as (client, app):
        dataplane = app.state.gateway.dataplane
        async with Traffic([client], digits_samples[0]).running(6) as traffic:
            await eventually(lambda: len(traffic.served) > 50, "load under way")
            for i in range(1, 21):
                version = copy.deepcopy(versions[i % len(versions)])
                version["models"]["digits"]["timeout_ms"] = 3000 + i  # every file differs
                write(path, version)
                await eventually(
                    lambda i=i: dataplane.config.models["digits"].timeout_ms == 3000 + i,
                    f"reload {i}",
                )
                served = len(traffic.served)
                await eventually(
                    lambda served=served: len(traffic.served) > served + 20,
                    f"traffic after reload {i}",
                )
            # A bad file changes nothing: the last good configuration keeps serving.
            kept = dataplane.plane
            write(path, "backends: {}\nmodels: {digits: {routes: []}}\n")
            reloads = app.state.gateway.metrics.config_reloads
            await eventually(lambda: reloads.labels("error").value == 1, "the refusal")
            served = len(traffic.served)
            await eventually(lambda: len(traffic.served) > served + 50, "traffic after the refusal")
            assert dataplane.plane is kept
        await dataplane.wait_drained()
        metrics = (await client.get("/metrics")).text
    assert traffic.statuses() == {200}
    # Every configuration served: all three backends answered at some point.
    assert {a.backend for a in traffic.served} == {"ts", "tfs", "tfs-rest"}
    assert metric(metrics, "duoserve_config_reloads_total", result="ok") == 20
    assert metric(metrics, "duoserve_config_reloads_total", result="error") == 1


async def test_unchanged_backends_keep_their_connections_and_circuits(
    torchserve: TorchServe, tfserving: Any, tmp_path: Path
) -> None:
    every = backends_of(torchserve, tfserving)
    path = tmp_path / "models.yaml"
    async with gateway(path, gateway_config(every, ts=1, tfs=1)) as (client, app):
        dataplane = app.state.gateway.dataplane
        before = dict(dataplane.backends), dict(dataplane.guards)
        assert (await client.post("/v2/models/digits/infer", content=BODY)).status_code == 200
        changed = gateway_config(every, ts=1, tfs=1)
        changed["backends"]["tfs"] = {**changed["backends"]["tfs"], "timeout_ms": 4000}
        write(path, changed)
        await eventually(lambda: dataplane.backends["tfs"] is not before[0]["tfs"], "reload")
        assert dataplane.backends["ts"] is before[0]["ts"]  # same pool, same key handling
        assert dataplane.guards["ts"] is before[1]["ts"]  # same limiter and circuit
        assert dataplane.guards["tfs"] is not before[1]["tfs"]
        await dataplane.wait_drained()
        assert before[0]["tfs"].endpoints.endpoints == {}  # the replaced backend is closed
        assert (await client.post("/v2/models/digits/infer", content=BODY)).status_code == 200


async def test_a_removed_backend_finishes_its_calls_in_flight(
    torchserve: TorchServe, tfserving: Any, tmp_path: Path
) -> None:
    every = backends_of(torchserve, tfserving)
    path = tmp_path / "models.yaml"
    async with gateway(path, gateway_config(every, tfs=1)) as (client, app):
        dataplane = app.state.gateway.dataplane
        old = dataplane.backends["tfs"]
        tfserving.set_delay(1500)
        try:
            slow = asyncio.create_task(client.post("/v2/models/digits/infer", content=BODY))
            await eventually(lambda: dataplane.guards["tfs"].limiter.active == 1, "in flight")
            write(path, gateway_config(every, ts=1))
            await eventually(lambda: "tfs" not in dataplane.backends, "the reload")
            fast = await client.post("/v2/models/digits/infer", content=BODY)
            assert fast.headers["x-duoserve-backend"] == "ts"
            answer = await slow
        finally:
            tfserving.set_delay(0)
        assert answer.status_code == 200
        assert answer.headers["x-duoserve-backend"] == "tfs"
        await dataplane.wait_drained()
        assert old.endpoints.endpoints == {}


async def test_a_kubernetes_configmap_swap_is_seen(tmp_path: Path) -> None:
    """A mounted ConfigMap is a folder whose files are symlinks through `..data`, which the
    kubelet points at a new folder in one rename: the gateway reads through the links."""
    mount = tmp_path / "config"
    mount.mkdir()

    def publish(stamp: str, data: dict[str, Any]) -> None:
        folder = mount / f"..{stamp}"
        folder.mkdir()
        (folder / "models.yaml").write_text(yaml.safe_dump(data))
        link = mount / "..data_tmp"
        link.symlink_to(folder.name)
        os.replace(link, mount / "..data")

    pytorch_only: dict[str, Any] = {
        "backends": {"local": {"kind": "embedded", "model_store": str(STORE)}},
        "models": {"digits": {**DIGITS_IO, "routes": PYTORCH_ROUTE}},
    }
    publish("2026_12_01_10_00_00.1", pytorch_only)
    (mount / "models.yaml").symlink_to("..data/models.yaml")
    app = create_app(
        Settings(config=str(mount / "models.yaml"), config_poll_s=0.05),
        registry=CollectorRegistry(),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            assert (await client.get("/v2/models/digits-copy")).status_code == 404
            two = copy.deepcopy(pytorch_only)
            two["models"]["digits-copy"] = two["models"]["digits"]
            publish("2026_12_01_10_01_00.2", two)
            await eventually(
                lambda: "digits-copy" in app.state.gateway.dataplane.models, "the swap seen"
            )
            answer = await client.post("/v2/models/digits-copy/infer", content=BODY)
            assert answer.status_code == 200


def test_sighup_reloads_and_a_bad_file_is_refused(model_store: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    one: dict[str, Any] = {
        "backends": {"local": {"kind": "embedded", "model_store": str(model_store)}},
        "models": {"digits": {**DIGITS_IO, "routes": PYTORCH_ROUTE}},
    }
    config.write_text(yaml.safe_dump(one))
    gateway = Gateway(config, tmp_path, env={"DUOSERVE_CONFIG_POLL_S": "0"})
    try:
        gateway.start()
        assert gateway.proc is not None
        two = copy.deepcopy(one)
        two["models"]["digits-copy"] = two["models"]["digits"]
        write(config, two)
        time.sleep(0.5)  # no polling: nothing may change until the signal
        assert http_get(gateway.url + "/v2/models/digits-copy")[0] == 404
        os.kill(gateway.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while http_get(gateway.url + "/v2/models/digits-copy")[0] != 200:
            assert time.monotonic() < deadline, "SIGHUP did not reload models.yaml"
            time.sleep(0.1)

        write(config, "backends: {local: {kind: embedded}}\nmodels: {digits: {inputs: []}}\n")
        os.kill(gateway.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            text = http_get(gateway.url + "/metrics")[1].decode()
            if metric(text, "duoserve_config_reloads_total", result="error") == 1:
                break
            assert time.monotonic() < deadline, "the bad file was not refused"
            time.sleep(0.1)
        assert metric(text, "duoserve_config_reloads_total", result="ok") == 1
        status, _ = http_get(gateway.url + "/v2/models/digits-copy")
        assert status == 200  # the last good configuration serves on
        log = gateway.log.read_text()
        assert "models.yaml not reloaded" in log
        assert "models.digits.inputs: List should have at least 1 item" in log
    finally:
        gateway.stop()
