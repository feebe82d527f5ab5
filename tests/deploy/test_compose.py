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
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from duoserve.config import load_config
from tests.deploy.deploy_checks import ROOT, load_module, load_yaml, torchserve_stop_timeout_s

BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
ENV = {
    "GRAFANA_ADMIN_PASSWORD": "test-only",
    "DUOSERVE_API_KEYS_PATH": str(ROOT / "deploy" / "compose" / "models.yaml"),
}
PUBLISHED = {"gateway": 8000, "prometheus": 9090, "grafana": 3000}
BACKENDS = ("torchserve", "tfserving")
preflight = load_module(ROOT / "deploy/compose/preflight.py")
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


def _uid(service: dict[str, Any], dockerfile: Path) -> str:
    """The uid a service's process runs as: compose `user`, else the image's last USER."""
    if service.get("user"):
        return str(service["user"]).split(":")[0]
    users = re.findall(r"^USER (\S+)", dockerfile.read_text(), re.M)
    return users[-1].split(":")[0]


def test_the_gateway_can_authenticate_to_torchserve() -> None:
    # TorchServe 0.12 writes key_file.json with mode 0600 as its own uid; a gateway of another
    # uid reading it through a shared volume sends no key and every call is refused, while
    # healthchecks that read the key as TorchServe's uid stay green.
    stack = model(BASE)
    gateway, torchserve = stack["services"]["gateway"], stack["services"]["torchserve"]
    mounts = _mounts(gateway)
    config_source = Path(mounts[gateway["environment"]["DUOSERVE_CONFIG"]])
    config = load_config(config_source if config_source.is_absolute() else ROOT / config_source)
    token_file = config.backends["torchserve"].token_file  # type: ignore[union-attr]
    properties = (ROOT / "services/torchserve/config.properties").read_text()
    auth_off = "--disable-token-auth" in (torchserve.get("command") or []) or bool(
        re.search(r"^disable_token_authorization=true", properties, re.M)
    )
    if auth_off:
        # Nothing to read; the boundary is the internal network (no published port).
        assert token_file is None
        assert set(torchserve["networks"]) == {"backend"} and not torchserve.get("ports")
        assert stack["networks"]["backend"]["internal"] is True
        assert "healthcheck" in torchserve and "key_file" not in str(torchserve["healthcheck"])
    else:
        assert token_file is not None
        assert _uid(gateway, ROOT / "services/gateway/Dockerfile") == _uid(
            torchserve, ROOT / "services/torchserve/Dockerfile"
        )
        workdir = re.search(
            r"^WORKDIR (\S+)", (ROOT / "services/torchserve/Dockerfile").read_text(), re.M
        )
        assert workdir is not None
        assert _mounts(torchserve)[workdir.group(1)] == mounts[str(Path(token_file).parent)]


def test_torchserve_runs_with_token_auth_off_in_compose_as_in_kubernetes() -> None:
    # The choice the test above allows, made explicit: one security model for both.
    stack = model(BASE)
    assert stack["services"]["torchserve"]["command"] == ["--disable-token-auth"]
    assert "torchserve-run" not in str(stack["services"]["gateway"].get("volumes"))


def test_gpu_backends_get_distinct_gpus_and_tfserving_caps_its_memory() -> None:
    stack = model(BASE, GPU)
    devices = {}
    for name in BACKENDS:
        reservations = stack["services"][name]["deploy"]["resources"]["reservations"]
        (device,) = reservations["devices"]
        # `count: 1` gives every service the host's first GPU.
        assert "count" not in device, name
        devices[name] = {str(d) for d in device["device_ids"]}
    assert devices["torchserve"] and devices["tfserving"]
    assert devices["torchserve"].isdisjoint(devices["tfserving"])
    # Left to itself TensorFlow maps nearly all of its GPU's memory at start; capped, a host
    # with one GPU (make up-gpu puts both backends on it) still has room for TorchServe.
    command = " ".join(stack["services"]["tfserving"]["command"])
    fraction = re.search(r"--per_process_gpu_memory_fraction=([0-9.]+)", command)
    assert fraction is not None and 0 < float(fraction.group(1)) < 1


@pytest.mark.parametrize("gpus, tfserving_gpu", [(1, "0"), (2, "1"), (8, "1")])
def test_make_up_gpu_gives_each_backend_its_own_gpu_when_there_are_two(
    tmp_path: Path, gpus: int, tfserving_gpu: str
) -> None:
    # nvidia-smi as the host's driver would answer `-L` with this many GPUs.
    fake = tmp_path / "nvidia-smi"
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 (UUID: GPU-{i:08d})"\n' for i in range(gpus))
    fake.write_text(f"#!/bin/sh\n{lines}")
    fake.chmod(0o755)
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "up-gpu"],
        cwd=ROOT,
        env={**os.environ, **ENV, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"TORCHSERVE_GPU=0 TFSERVING_GPU={tfserving_gpu} " in done.stdout, done.stdout


def test_torchserve_gets_its_stop_timeout_before_compose_kills_it() -> None:
    grace = model(BASE)["services"]["torchserve"]["stop_grace_period"]
    seconds = float(str(grace).removesuffix("s"))
    assert seconds >= torchserve_stop_timeout_s() + 5


def test_file_secrets_claim_no_uid_or_mode_compose_would_ignore() -> None:
    stack = model(BASE)
    for name, service in stack["services"].items():
        for secret in service.get("secrets", []):
            if isinstance(secret, dict):
                assert not {"uid", "gid", "mode"} & set(secret), f"{name}: {secret}"


def test_preflight_checks_the_uid_the_gateway_image_runs_as() -> None:
    users = re.findall(
        r"^USER (\d+):(\d+)", (ROOT / "services/gateway/Dockerfile").read_text(), re.M
    )
    assert (preflight.GATEWAY_UID, preflight.GATEWAY_GID) == tuple(map(int, users[-1]))


@pytest.mark.parametrize("mode, readable", [(0o600, False), (0o640, False), (0o644, True)])
def test_make_up_refuses_a_keys_file_the_gateway_could_not_read(
    tmp_path: Path, mode: int, readable: bool
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: []\n")
    keys.chmod(mode)
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy/compose/preflight.py")],
        env={**os.environ, **ENV, "DUOSERVE_API_KEYS_PATH": str(keys)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode == 0) is readable, done.stderr
    if not readable:
        assert f"chmod 0644 {keys}" in done.stderr and "uid 10001" in done.stderr


def test_preflight_reads_owner_and_group_bits_for_the_gateway_uid(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: []\n")
    info = keys.stat()
    keys.chmod(0o600)
    assert preflight.readable_by(keys, info.st_uid, info.st_gid + 1)
    assert not preflight.readable_by(keys, info.st_uid + 1, info.st_gid)
    keys.chmod(0o640)
    assert preflight.readable_by(keys, info.st_uid + 1, info.st_gid)


def test_preflight_names_missing_variables() -> None:
    assert preflight.problems({}) == ["set GRAFANA_ADMIN_PASSWORD", "set DUOSERVE_API_KEYS_PATH"]


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
