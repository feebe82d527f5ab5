"""The TorchServe image's entrypoint, run here with the real TorchServe 0.12 (pip + Java 17) and
the image's own config.properties: the workers it starts, how it stops, what its exit says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.deploy_checks import ROOT
from tests.servers import (
    VENV_BIN,
    free_port,
    http_get,
    reserve_worker_ports,
    stop_group,
    wait_until,
)

pytestmark = pytest.mark.integration

ENTRYPOINT = ROOT / "services/torchserve/entrypoint.py"
IMAGE_CONFIG = ROOT / "services/torchserve/config.properties"


def read_properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}


def models_property() -> dict[str, dict[str, dict[str, object]]]:
    models: dict[str, dict[str, dict[str, object]]] = json.loads(
        read_properties(IMAGE_CONFIG.read_text())["models"]
    )
    return models


@dataclass
class Server:
    """The entrypoint as a process group, with the addresses its config gave TorchServe."""

    proc: subprocess.Popen[bytes]
    inference: str
    management: str
    tmp: Path
    log: Path

    def java_pid(self) -> int:
        return int((self.tmp / ".model_server.pid").read_text().split()[0])

    def exit_status(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


Start = Callable[..., Server]


def image_config(workdir: Path, store: Path, models: bool) -> tuple[Path, dict[str, str]]:
    """config.properties of the image with loopback ports and this machine's paths; the rest
    (workers, batching, queue, auth, timeouts) exactly as the image has it."""
    ports = {name: free_port() for name in ("inference", "management", "metrics")}
    overrides = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(free_port()),
        "grpc_management_port": str(free_port()),
        "model_store": str(store),
        "allowed_urls": f"file://{store}/[^/]+[.]mar",
        "initial_worker_port": str(reserve_worker_ports(16)),
        "disable_system_metrics": "true",
    }
    if not models:
        overrides["load_models"] = ""
        overrides["models"] = "{}"
    lines = []
    for line in IMAGE_CONFIG.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in overrides:
            continue
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items()]
    path = workdir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path, overrides


@pytest.fixture
def start(model_store: Path, tmp_path: Path) -> Iterator[Start]:
    """start(models=True, **env) runs the entrypoint as the image does (token auth off, as
    compose and Kubernetes run it) and waits until TorchServe answers /ping."""
    started: list[Server] = []

    def run(models: bool = True, **env: str) -> Server:
        workdir = tmp_path / f"ts{len(started)}"
        (workdir / "tmp").mkdir(parents=True)
        config, props = image_config(workdir, model_store / "torchserve", models)
        log = workdir / "entrypoint.out"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ENTRYPOINT),
                    "--ts-config",
                    str(config),
                    "--model-store",
                    str(model_store / "torchserve"),
                    "--disable-token-auth",
                ],
                cwd=workdir,
                env={
                    **os.environ,
                    "TMPDIR": str(workdir / "tmp"),
                    "LOG_LOCATION": str(workdir / "logs"),
                    "METRICS_LOCATION": str(workdir / "logs"),
                    "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                    **env,
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(
            proc, props["inference_address"], props["management_address"], workdir / "tmp", log
        )
        started.append(server)
        wait_until(
            lambda: http_get(server.inference + "/ping")[0] == 200,
            180,
            "TorchServe under the entrypoint",
            proc,
            log,
        )
        return server

    try:
        yield run
    finally:
        for server in started:
            stop_group(server.proc, grace_s=30)


def _predict(server: Server, model: str) -> int:
    body = json.dumps([[[0.0] * 8] * 8]).encode()
    request = urllib.request.Request(
        f"{server.inference}/predictions/{model}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return int(response.status)


def _ready_workers(server: Server, model: str) -> list[dict[str, object]]:
    status, body = http_get(f"{server.management}/models/{model}")
    assert status == 200, body
    (description,) = json.loads(body)
    return [w for w in description["workers"] if w["status"] == "READY"]


def test_the_image_config_starts_the_workers_it_configures_and_sigterm_stops_it(
    start: Start,
) -> None:
    server = start()
    for model, versions in models_property().items():
        (config,) = versions.values()
        wait_until(lambda m=model: _predict(server, m) == 200, 120, f"model {model}")
        # TorchServe starts minWorkers; with model registration off nothing ever adds more, so
        # maxWorkers above minWorkers would never run. Workers load one after another.
        wait_until(
            lambda m=model, n=config["maxWorkers"]: len(_ready_workers(server, m)) == n,
            120,
            f"{config['maxWorkers']} ready workers of {model}",
        )
        (description,) = json.loads(http_get(f"{server.management}/models/{model}")[1])
        assert description["minWorkers"] == config["minWorkers"] == config["maxWorkers"]

    began = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.exit_status(timeout_s=30) == 0, server.output()
    assert time.monotonic() - began < 20
    assert "TorchServe stopped" in server.output()
    with pytest.raises(ProcessLookupError):
        os.killpg(server.proc.pid, 0)  # Java and its Python workers are gone too


def test_a_frontend_that_dies_makes_the_container_fail(start: Start) -> None:
    server = start(models=False)
    os.kill(server.java_pid(), signal.SIGKILL)
    assert server.exit_status(timeout_s=30) == 1, server.output()
    assert "ended on its own" in server.output()


def test_a_frontend_that_ignores_sigterm_is_killed_within_the_stop_timeout(start: Start) -> None:
    server = start(models=False, TS_STOP_TIMEOUT_S="2")
    java = server.java_pid()
    os.kill(java, signal.SIGSTOP)  # a frozen JVM: SIGTERM stays pending, only SIGKILL acts
    began = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.exit_status(timeout_s=20) == 1, server.output()
    assert time.monotonic() - began < 8
    assert "did not stop within 2 s" in server.output()
    with pytest.raises(ProcessLookupError):
        os.kill(java, 0)


def test_a_launcher_error_is_the_exit_status(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "--model-store", str(tmp_path / "missing")],
        cwd=tmp_path,
        env={
            **os.environ,
            "TMPDIR": str(tmp_path),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "--model-store directory not found" in done.stdout
    assert "launcher failed with status 1" in done.stderr
