"""What `pip install .` and `pip install '.[bench]'` deliver: the gateway alone, without the load
generator or its HTTP client (aiohttp), and the load generator only with the `bench` extra."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.deploy.test_images import DOCKERFILES, instructions
from tests.servers import REPO

GATEWAY_PACKAGE = REPO / "services" / "gateway" / "duoserve"


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` of the file names, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _build_wheel(context: Path, out: Path) -> zipfile.ZipFile:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(context),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("duoserve-*.whl")
    return zipfile.ZipFile(wheel)


def _requirements(wheel: zipfile.ZipFile) -> list[str]:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return [
        line.removeprefix("Requires-Dist: ")
        for line in wheel.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist: ")
    ]


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(
            source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        )
    else:
        shutil.copy2(source, target)


def test_no_module_of_the_gateway_imports_aiohttp() -> None:
    offenders = {
        str(path.relative_to(REPO))
        for path in GATEWAY_PACKAGE.rglob("*.py")
        if any(m.split(".")[0] == "aiohttp" for m in _imported_modules(path))
    }
    assert offenders == set()
    # The scan sees imports: the load generator, which does import aiohttp, is caught by it.
    assert "aiohttp" in _imported_modules(REPO / "bench" / "duoserve_bench" / "loadgen.py")


def test_gateway_dependencies_leave_aiohttp_to_the_bench_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [r.split("==")[0].split("[")[0].lower() for r in project["dependencies"]]
    assert "aiohttp" not in names
    extras = project["optional-dependencies"]
    assert any(r.startswith("aiohttp==") for r in extras["bench"])
    # `make setup` installs .[dev]: the tests and `make bench` get the load generator.
    assert any("bench" in r for r in extras["dev"] if r.startswith("duoserve["))
    for requirement in (*project["dependencies"], *(r for rs in extras.values() for r in rs)):
        assert "==" in requirement or requirement.startswith("duoserve["), requirement


def test_the_gateway_image_wheel_carries_neither_the_load_generator_nor_aiohttp(
    tmp_path: Path,
) -> None:
    # The build context as the gateway Dockerfile's build stage copies it into WORKDIR.
    steps = instructions(DOCKERFILES["gateway"])
    build_stage = steps[: [i for i, (word, _) in enumerate(steps) if word == "FROM"][1]]
    context = tmp_path / "context"
    for word, rest in build_stage:
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, dest = [p for p in rest.split() if not p.startswith("--")]
        for source in sources:
            into_folder = dest.endswith("/") or dest == "." or len(sources) > 1
            target = context / dest / Path(source).name if into_folder else context / dest
            _copy(REPO / source, target)
    wheel = _build_wheel(context, tmp_path / "dist")
    top_level = {name.split("/")[0] for name in wheel.namelist()}
    assert "duoserve" in top_level
    assert "duoserve_bench" not in top_level
    base = [r for r in _requirements(wheel) if "extra ==" not in r]
    assert base and not [r for r in base if r.lower().startswith("aiohttp")]


def test_a_checkout_installs_the_load_generator_with_the_bench_extra(tmp_path: Path) -> None:
    context = tmp_path / "checkout"
    parts = ("pyproject.toml", "README.md", "services/gateway/duoserve", "bench/duoserve_bench")
    for part in parts:
        _copy(REPO / part, context / part)
    wheel = _build_wheel(context, tmp_path / "dist")
    assert "duoserve_bench/loadgen.py" in wheel.namelist()
    assert "duoserve_bench/cli.py" in wheel.namelist()
    requirements = _requirements(wheel)
    assert [r for r in requirements if r.startswith("aiohttp==") and r.endswith('extra == "bench"')]
    assert not [r for r in requirements if r.startswith("aiohttp") and "extra" not in r]
