"""The `duoserve` command as a user runs it: the installed script in a subprocess, its exit
code and what it prints."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.servers import VENV_BIN

pytestmark = pytest.mark.integration

DUOSERVE = str(VENV_BIN / "duoserve")


def duoserve(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DUOSERVE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def hiding(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment in which ``modules`` are not installed: a module of that name earlier on
    the path raises what Python raises for a missing one."""
    folder = tmp_path / "hidden"
    folder.mkdir(exist_ok=True)
    for module in modules:
        (folder / f"{module}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n"
        )
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(folder) + (os.pathsep + path if path else "")}


# -- bench ------------------------------------------------------------------------------------


def test_bench_shows_its_options_when_installed() -> None:
    result = duoserve("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: duoserve bench")
    assert "--concurrency" in result.stdout and "--rate" in result.stdout


@pytest.mark.parametrize("missing", ["aiohttp", "duoserve_bench"])
def test_bench_without_the_extra_says_how_to_install_it(tmp_path: Path, missing: str) -> None:
    result = duoserve(
        "bench", "digits", "--url", "http://127.0.0.1:9", env=hiding(tmp_path, missing)
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    assert missing in lines[0] and "pip install 'duoserve[bench]'" in lines[0]
