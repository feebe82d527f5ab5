"""Static checks of the Dockerfiles and the build context (no Docker engine here)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.deploy.deploy_checks import ROOT

DOCKERFILES = {
    "gateway": ROOT / "services/gateway/Dockerfile",
    "torchserve": ROOT / "services/torchserve/Dockerfile",
    "tfserving": ROOT / "services/tfserving/Dockerfile",
    "model-builder": ROOT / "models/Dockerfile",
}
SERVERS = ("gateway", "torchserve", "tfserving")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def base_images(path: Path) -> list[str]:
    """Every FROM image with the ARG defaults substituted; stage names and scratch left out."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args.setdefault(name, value)
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
            if image not in stages and image != "scratch":
                images.append(image)
    return images


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_and_syntax_are_pinned(name: str) -> None:
    path = DOCKERFILES[name]
    assert path.read_text().startswith("# syntax=docker/dockerfile:1.")
    for image in base_images(path):
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag not in ("", "latest"), f"{name}: {image}"
        assert re.search(r"\d", tag), f"{name}: {image} has no version in its tag"


@pytest.mark.parametrize("name", SERVERS)
def test_servers_run_as_a_numeric_non_root_user_with_a_healthcheck(name: str) -> None:
    steps = final_stage(DOCKERFILES[name])
    users = [rest for word, rest in steps if word == "USER"]
    assert users, f"{name}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]}"
    assert any(word == "HEALTHCHECK" for word, _ in steps), name


def test_gateway_image_is_multi_stage_and_carries_no_framework() -> None:
    steps = instructions(DOCKERFILES["gateway"])
    assert sum(word == "FROM" for word, _ in steps) >= 2
    installs = " ".join(rest for word, rest in steps if word == "RUN")
    # The gateway and its tracing extra (OpenTelemetry), so OTEL_EXPORTER_OTLP_ENDPOINT works.
    assert "pip install '.[tracing]'" in installs
    assert not re.search(r"torch|tensorflow|\[(models|dev|torch|tensorflow|bench)\]", installs)
    command = " ".join(rest for word, rest in final_stage(DOCKERFILES["gateway"]) if word == "CMD")
    # One worker per container: the gateway refuses more (its metrics are per process).
    assert "duoserve serve" in command and "--workers" not in command


def test_backends_never_expose_management_or_grpc_ports() -> None:
    for name in ("torchserve", "tfserving"):
        steps = instructions(DOCKERFILES[name])
        exposed = {int(p.split("/")[0]) for w, rest in steps if w == "EXPOSE" for p in rest.split()}
        assert not exposed & {8081, 7070, 7071}, name
        assert "--enable-model-api" not in DOCKERFILES[name].read_text()


def test_tfserving_starts_with_the_three_config_files_that_exist() -> None:
    text = DOCKERFILES["tfserving"].read_text()
    for flag, file in (
        ("--model_config_file", "models.config"),
        ("--batching_parameters_file", "batching.config"),
        ("--monitoring_config_file", "monitoring.config"),
    ):
        assert f"{flag}=/models/{file}" in text
        assert (ROOT / "services/tfserving" / file).is_file(), file
    assert "--enable_batching" in text


def test_tfserving_base_image_is_a_build_arg_with_a_gpu_variant() -> None:
    images = base_images(DOCKERFILES["tfserving"])
    assert len(images) == 1 and not images[0].endswith("-gpu")
    tag = images[0].rpartition(":")[2]
    assert f"TF_SERVING_TAG: {tag}-gpu" in (ROOT / "docker-compose.gpu.yml").read_text()
    assert f"TF_SERVING_TAG={tag}-gpu" in (ROOT / "mk/deploy.mk").read_text()


def test_torchserve_image_has_a_cpu_and_a_gpu_variant() -> None:
    assert arg_defaults(DOCKERFILES["torchserve"])["VARIANT"] == "cpu"
    text = DOCKERFILES["torchserve"].read_text()
    assert "cpu) pip install --index-url https://download.pytorch.org/whl/cpu" in text
    assert 'gpu) pip install "torch==${TORCH_VERSION}"' in text
    assert "VARIANT: gpu" in (ROOT / "docker-compose.gpu.yml").read_text()
    assert "--build-arg VARIANT=gpu" in (ROOT / "mk/deploy.mk").read_text()


def arg_defaults(path: Path) -> dict[str, str]:
    """Every ARG with a default, first definition wins (as base_images substitutes them)."""
    found: dict[str, str] = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            found.setdefault(name, value.strip('"'))
    return found


def python_of(name: str) -> tuple[int, int]:
    """The Python minor version an image runs, from its python:X.Y... base image."""
    pythons = {image for image in base_images(DOCKERFILES[name]) if image.startswith("python:")}
    assert len(pythons) == 1, f"{name}: Python base images {pythons}"
    image = pythons.pop()
    match = re.fullmatch(r"python:(\d+)\.(\d+)[.\w-]*", image)
    assert match, f"{name}: {image} names no Python version"
    return int(match.group(1)), int(match.group(2))


def pyproject_pin(dist: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    pins = set(re.findall(rf'"{re.escape(dist)}==([^";]+)"', text))
    assert len(pins) == 1, f"{dist}: pinned as {pins} in pyproject.toml"
    return pins.pop()


@pytest.mark.parametrize("name", ["gateway", "torchserve", "model-builder"])
def test_python_images_run_the_python_the_tests_run(name: str) -> None:
    # The TorchServe handler failed every request in a Python 3.9 image (zip(strict=) is 3.10+)
    # while the tests, on the host's Python, passed: the image's Python is the tests' Python.
    assert python_of(name) == sys.version_info[:2], (
        f"{name} runs Python {python_of(name)}, the tests run {sys.version_info[:2]}"
    )


def test_the_torch_that_exports_the_model_is_the_torch_torchserve_loads_it_with() -> None:
    installed = metadata.version("torch").split("+")[0]
    exporting = arg_defaults(DOCKERFILES["model-builder"])["TORCH_VERSION"]
    serving = arg_defaults(DOCKERFILES["torchserve"])["TORCH_VERSION"]
    assert exporting == serving == pyproject_pin("torch") == installed
    # And the images install exactly that torch (no unpinned reinstall by a later step).
    for name in ("model-builder", "torchserve"):
        assert '"torch==${TORCH_VERSION}"' in DOCKERFILES[name].read_text(), name


def test_the_torchserve_image_runs_the_torchserve_and_java_the_tests_run() -> None:
    pinned = arg_defaults(DOCKERFILES["torchserve"])["TORCHSERVE_VERSION"]
    assert pinned == pyproject_pin("torchserve") == metadata.version("torchserve")
    java = re.findall(r"openjdk-(\d+)-jre-headless", DOCKERFILES["torchserve"].read_text())
    done = subprocess.run(["java", "-version"], capture_output=True, text=True, check=True)
    host = re.search(r'version "(\d+)', done.stderr)
    assert host is not None and java == [host.group(1)]


def test_tfserving_runs_the_tensorflow_release_that_exports_the_savedmodel() -> None:
    (image,) = base_images(DOCKERFILES["tfserving"])
    release = image.rpartition(":")[2].split("-")[0]
    assert release == pyproject_pin("tensorflow-cpu") == metadata.version("tensorflow-cpu")


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = (
            re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        )
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_dockerfiles_copy_and_no_build_output() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name, path in DOCKERFILES.items():
        for word, rest in instructions(path):
            if word != "COPY" or "--from=" in rest:
                continue
            sources = [p for p in rest.split() if not p.startswith("--")][:-1]
            for source in sources:
                assert not _dockerignore_excludes(source, patterns), f"{name}: COPY {source}"
    for ignored in (
        "models/store/torchserve/digits.mar",
        ".venv/bin/python",
        ".git/HEAD",
        "tests/x",
    ):
        assert _dockerignore_excludes(ignored, patterns), ignored


def test_torchserve_keys_outlive_a_long_running_gateway() -> None:
    # Keys expire after token_expiration_min (TorchServe default 60) and only the management
    # API, which the gateway never reaches, can renew them: compose would fail after an hour.
    text = (ROOT / "services/torchserve/config.properties").read_text()
    minutes = re.search(r"^token_expiration_min=(\d+)", text, re.M)
    assert minutes is not None and int(minutes.group(1)) >= 7 * 24 * 60
