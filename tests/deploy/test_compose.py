"""Checks of docker-compose.yml and docker-compose.gpu.yml.

`docker compose config` needs the Compose plugin; where the docker client here lacks it, the
files are merged and interpolated by the small model below and the same policies are checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from duoserve.config import load_config
from tests.deploy.deploy_checks import ROOT, load_yaml

BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
ENV = {
    "GRAFANA_ADMIN_PASSWORD": "test-only",
    "DUOSERVE_API_KEYS_PATH": str(ROOT / "deploy" / "compose" / "models.yaml"),
}
PUBLISHED = {"gateway": 8000, "prometheus": 9090, "grafana": 3000}
BACKENDS = ("torchserve", "tfserving")
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _compose_plugin() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    done = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    return done.returncode == 0


HAVE_COMPOSE = _compose_plugin()


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?message} interpolation, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current else arg
        if op in (":?", "?") and not current:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return current or ""

    return _VAR.sub(one, value)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge for the shapes these files use: mappings merge, everything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def model(*files: Path, env: dict[str, str] = ENV) -> dict[str, Any]:
    """The effective compose model of the files, by `docker compose config` or by the model."""
    if HAVE_COMPOSE:
        args = ["docker", "compose"] + [a for f in files for a in ("-f", str(f))]
        done = subprocess.run(
            [*args, "config", "--format", "json"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **env},
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        loaded: dict[str, Any] = json.loads(done.stdout)
        return loaded
    merged: dict[str, Any] = {}
    for path in files:
        merged = merge(merged, load_yaml(path))
    # YAML merge keys (<<) are resolved by PyYAML already.
    result: dict[str, Any] = interpolate(merged, env)
    return result


def published_ports(service: dict[str, Any]) -> list[int]:
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append(int(port["target"]))
        else:
            ports.append(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return ports


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def stack(request: pytest.FixtureRequest) -> dict[str, Any]:
    return model(BASE) if request.param == "cpu" else model(BASE, GPU)


def test_grafana_password_and_api_keys_are_required() -> None:
    for name in ENV:
        with pytest.raises((ValueError, AssertionError)):
            model(BASE, env={k: v for k, v in ENV.items() if k != name})


def test_files_carry_no_secret_values() -> None:
    text = BASE.read_text() + GPU.read_text()
    assert "GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:?" in text
    assert not re.search(r"(?i)(password|token|secret)\s*[:=]\s*['\"]?[A-Za-z0-9]{8,}", text)


def test_only_gateway_prometheus_and_grafana_publish_ports(stack: dict[str, Any]) -> None:
    published = {
        name: published_ports(svc) for name, svc in stack["services"].items() if svc.get("ports")
    }
    assert published == {name: [port] for name, port in PUBLISHED.items()}


def test_backends_sit_on_an_internal_network_only(stack: dict[str, Any]) -> None:
    networks = stack["networks"]
    for name in (*BACKENDS, *(["dcgm-exporter"] if "dcgm-exporter" in stack["services"] else [])):
        attached = stack["services"][name]["networks"]
        assert set(attached) == {"backend"}, name
    assert networks["backend"]["internal"] is True
    assert "backend" not in stack["services"]["grafana"]["networks"]


def test_long_running_services_have_healthchecks_and_wait_for_health(
    stack: dict[str, Any],
) -> None:
    for name, svc in stack["services"].items():
        if name in ("model-builder", "dcgm-exporter"):
            continue  # a one-shot, and an exporter nothing waits for
        assert svc.get("healthcheck", {}).get("test"), name
        for dep, how in (svc.get("depends_on") or {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(stack["services"]["gateway"]["depends_on"]) == set(BACKENDS)


def test_images_are_pinned(stack: dict[str, Any]) -> None:
    for name, svc in stack["services"].items():
        image = svc["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and "/" not in tag and tag != "latest", f"{name}: {image}"


def test_backends_are_built_from_the_model_builder(stack: dict[str, Any]) -> None:
    for name in BACKENDS:
        build = stack["services"][name]["build"]
        assert build["additional_contexts"]["model-store"] == "service:model-builder"
    assert stack["services"]["model-builder"]["build"]["dockerfile"] == "models/Dockerfile"


def test_gpu_override_reserves_gpus_for_both_backends_only() -> None:
    stack = model(BASE, GPU)
    reserving = {
        name
        for name, svc in stack["services"].items()
        for device in svc.get("deploy", {})
        .get("resources", {})
        .get("reservations", {})
        .get("devices", [])
        if "gpu" in device["capabilities"] and device["driver"] == "nvidia"
    }
    assert reserving == {"torchserve", "tfserving", "dcgm-exporter"}
    for name in BACKENDS:
        assert stack["services"][name]["image"].endswith("-gpu")
        assert str(stack["services"][name]["build"]["args"]).count("gpu") == 1
    cpu = model(BASE)
    assert all("deploy" not in svc for svc in cpu["services"].values())
    assert "dcgm-exporter" not in cpu["services"]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of each volume of a service."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = str(volume["source"])
        else:
            source, target = volume.split(":")[:2]
            found[target] = source
    return found


def test_gateway_config_and_torchserve_key_are_wired() -> None:
    stack = model(BASE)
    gateway, torchserve = stack["services"]["gateway"], stack["services"]["torchserve"]
    env = gateway["environment"]
    mounts = _mounts(gateway)
    config_source = Path(mounts[env["DUOSERVE_CONFIG"]])  # absolute after `docker compose config`
    config = load_config(config_source if config_source.is_absolute() else ROOT / config_source)
    token_file = config.backends["torchserve"].token_file  # type: ignore[union-attr]
    assert token_file is not None and token_file.endswith("/key_file.json")
    # The gateway reads key_file.json from the volume that is TorchServe's working directory.
    key_dir = str(Path(token_file).parent)
    workdir = re.search(
        r"^WORKDIR (\S+)", (ROOT / "services/torchserve/Dockerfile").read_text(), re.M
    )
    assert workdir is not None
    volume = mounts[key_dir]
    assert _mounts(torchserve)[workdir.group(1)] == volume
    assert gateway["environment"]["DUOSERVE_WORKERS"]


def test_grafana_and_prometheus_mount_what_their_provisioning_expects() -> None:
    stack = model(BASE)
    grafana_mounts = _mounts(stack["services"]["grafana"])
    provider = load_yaml(ROOT / "deploy/grafana/provisioning/dashboards/duoserve.yml")
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert grafana_mounts[dashboards_path].rstrip("/").endswith("deploy/grafana/dashboards")
    datasource = load_yaml(ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    prometheus = load_yaml(ROOT / "deploy/prometheus/prometheus.yml")
    gpu_services = model(BASE, GPU)["services"]
    for job in prometheus["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in gpu_services, target


def test_compose_models_yaml_passes_the_gateway_config_check() -> None:
    config = load_config(ROOT / "deploy/compose/models.yaml")
    assert set(config.models) == {"digits", "digits-pytorch", "digits-tensorflow"}
    routes = {r.backend: r.weight for r in config.models["digits"].routes}
    assert routes == {"torchserve": 50, "tfserving": 50}


def test_yaml_files_parse() -> None:
    for path in (BASE, GPU):
        assert isinstance(yaml.safe_load(path.read_text()), dict)
