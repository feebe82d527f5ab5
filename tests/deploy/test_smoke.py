"""deploy/smoke.py (what `make smoke` runs after `make up`) against a real stack on this machine:
a gateway on a socket with API keys on, the real TorchServe, the TF Serving stand-in and a real
Prometheus scraping all three. Docker is not here; the compose wiring is tested in test_compose."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_checks import ROOT
from tests.prometheus_fixture import PrometheusHandle, start_prometheus
from tests.servers import Gateway, free_port

pytestmark = pytest.mark.integration

SMOKE = ROOT / "deploy/smoke.py"


def smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SMOKE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smoke") / ".smoke"
    done = smoke("prepare", str(folder))
    assert done.returncode == 0, done.stderr
    return folder


def start_gateway(workdir: Path, keys: Path, backends: dict[str, Any]) -> Gateway:
    """The compose models.yaml's models, on the given backends, with the smoke's API key."""
    compose = yaml.safe_load((ROOT / "deploy/compose/models.yaml").read_text())
    config = workdir / "models.yaml"
    config.write_text(yaml.safe_dump({"backends": backends, "models": compose["models"]}))
    gateway = Gateway(
        config,
        workdir,
        env={"DUOSERVE_API_KEYS_FILE": str(keys / "keys.yaml"), "DUOSERVE_LOG_LEVEL": "warning"},
    )
    gateway.start()
    return gateway


@pytest.fixture(scope="module")
def stack(
    torchserve: Any, tfserving: Any, keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, PrometheusHandle]]:
    workdir = tmp_path_factory.mktemp("smoke-stack")
    backends = {
        "torchserve": {
            "kind": "torchserve",
            "url": torchserve.url,
            "token_file": str(torchserve.key_file),
        },
        "tfserving": {
            "kind": "tfserving",
            "protocol": "grpc",
            "grpc": tfserving.grpc_address,
            "url": tfserving.rest_url,
        },
    }
    gateway = start_gateway(workdir, keys, backends)
    prometheus = None
    try:
        prometheus = start_prometheus(
            workdir,
            {
                "duoserve-gateway": [gateway.url.removeprefix("http://")],
                "torchserve": [torchserve.metrics_target],
                "tfserving": (
                    tfserving.rest_url.removeprefix("http://"),
                    "/monitoring/prometheus/metrics",
                ),
            },
        )
        yield gateway, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        gateway.stop()


def test_smoke_passes_on_a_stack_that_serves_both_frameworks(
    stack: tuple[Gateway, PrometheusHandle], keys: Path
) -> None:
    gateway, prometheus = stack
    done = smoke(
        "check",
        "--url",
        gateway.url,
        "--api-key-file",
        str(keys / "api-key"),
        "--prometheus-url",
        prometheus.url,
        "--no-grafana",
        "--wait-s",
        "60",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for model in ("digits-pytorch", "digits-tensorflow"):
        for door in ("v2", "tfserving", "torchserve"):
            assert any(line.startswith("ok") and door in line and model in line for line in lines)
    assert any(line.startswith("ok    prometheus") for line in lines)
    assert "smoke test passed: 8 checks" in done.stdout


def test_smoke_fails_loudly_on_a_key_the_gateway_refuses(
    stack: tuple[Gateway, PrometheusHandle],
) -> None:
    gateway, _ = stack
    done = smoke(
        "check", "--url", gateway.url, "--api-key", "dsk_wrong", "--no-prometheus",
        "--no-grafana", "--wait-s", "5",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.count("HTTP 401") == 6, done.stdout
    assert "SMOKE TEST FAILED: 6 of 7 checks" in done.stderr


def test_smoke_names_the_framework_that_does_not_answer(
    torchserve: Any, keys: Path, tmp_path: Path
) -> None:
    # TF Serving is down (nothing listens at its address): PyTorch passes, TensorFlow fails,
    # Prometheus reports the target down, Grafana is unreachable.
    dead = f"127.0.0.1:{free_port()}"
    backends = {
        "torchserve": {
            "kind": "torchserve",
            "url": torchserve.url,
            "token_file": str(torchserve.key_file),
        },
        "tfserving": {"kind": "tfserving", "protocol": "grpc", "grpc": dead},
    }
    gateway = start_gateway(tmp_path, keys, backends)
    try:
        done = smoke(
            "check", "--url", gateway.url, "--api-key-file", str(keys / "api-key"),
            "--no-prometheus", "--grafana-url", f"http://{dead}", "--wait-s", "5",
        )  # fmt: skip
    finally:
        gateway.stop()
    assert done.returncode == 1
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert all("digits-tensorflow" in line for line in failed[:-1]), done.stdout
    assert len(failed) == 4 and failed[-1].startswith("FAIL  grafana"), done.stdout
    passed = [line for line in done.stdout.splitlines() if line.startswith("ok")]
    assert len(passed) == 4 and all("digits-tensorflow" not in line for line in passed)


def test_prepare_writes_a_key_only_its_owner_reads_and_a_digest_the_gateway_can(
    keys: Path,
) -> None:
    assert (keys / "api-key").stat().st_mode & 0o777 == 0o600
    assert (keys / "keys.yaml").stat().st_mode & 0o777 == 0o644
    entry = yaml.safe_load((keys / "keys.yaml").read_text())["keys"][0]
    assert (keys / "api-key").read_text().strip() not in (keys / "keys.yaml").read_text()
    assert len(entry["sha256"]) == 64
    env = (keys / "env").read_text()
    assert "GRAFANA_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:-" in env
    assert f"DUOSERVE_API_KEYS_PATH={(keys / 'keys.yaml').resolve()}" in env
