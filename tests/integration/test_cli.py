"""The `duoserve` command as a user runs it: the installed script in a subprocess, its exit
code and what it prints."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import DIGITS_IO, v2_body
from tests.servers import REPO, VENV_BIN, Gateway, free_port

pytestmark = pytest.mark.integration

DUOSERVE = str(VENV_BIN / "duoserve")


def duoserve(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DUOSERVE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def config_file(path: Path, model_store: Path, **models: Any) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "backends": {"local": {"kind": "embedded", "model_store": str(model_store)}},
                "models": {name: {**DIGITS_IO, **spec} for name, spec in models.items()},
            }
        )
    )
    return path


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failing command prints on stderr: a message, not a traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


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


# -- help, config check, models ---------------------------------------------------------------


def test_help_names_every_command_and_no_command_is_a_usage_error() -> None:
    result = duoserve("--help")
    assert result.returncode == 0
    for command in ("serve", "config", "models", "compare", "keys", "bench"):
        assert command in result.stdout
    bare = duoserve()
    assert bare.returncode == 2 and bare.stderr.startswith("usage: duoserve")


def test_config_check_passes_a_valid_file_and_names_each_bad_key(
    tmp_path: Path, model_store: Path
) -> None:
    # As the README writes it, from the repository root.
    shipped = duoserve("config", "check", "models.yaml", cwd=REPO)
    assert shipped.returncode == 0, shipped.stderr
    assert shipped.stdout.startswith("models.yaml: OK (")
    good = config_file(
        tmp_path / "good.yaml",
        model_store,
        digits={"routes": [{"backend": "local", "framework": "pytorch", "model": "digits"}]},
    )
    result = duoserve("config", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{good}: OK (1 backends, 1 models: digits)"
    bad = config_file(
        tmp_path / "bad.yaml",
        model_store,
        digits={
            "routes": [
                {"backend": "local", "framework": "pytorch", "model": "digits", "weight": -1}
            ]
        },
    )
    result = duoserve("config", "check", str(bad))
    assert result.returncode == 1 and result.stdout == ""
    assert "models.digits.routes.0.weight" in result.stderr and "Traceback" not in result.stderr
    missing = duoserve("config", "check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert "cannot read" in one_line(missing)


def test_models_lists_each_model_with_its_routes_and_shadow(
    tmp_path: Path, model_store: Path
) -> None:
    split = [
        {"backend": "local", "framework": "pytorch", "model": "digits", "weight": 90},
        {"backend": "local", "framework": "tensorflow", "model": "digits", "weight": 10},
    ]
    path = config_file(
        tmp_path / "models.yaml",
        model_store,
        digits={"routes": split, "shadow": {"backend": "local", "framework": "tensorflow"}},
        solo={"routes": [{"backend": "local", "framework": "pytorch", "model": "digits"}]},
    )
    result = duoserve("models", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "digits: pytorch@local w=90, tensorflow@local w=10  shadow: tensorflow@local",
        "solo: pytorch@local",
    ]


# -- keys -------------------------------------------------------------------------------------


def test_keys_hash_reads_the_key_on_stdin() -> None:
    result = duoserve("keys", "hash", stdin="dsk_example-key\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(b"dsk_example-key").hexdigest()
    empty = duoserve("keys", "hash", stdin="")
    assert empty.returncode == 2
    assert "give the key on stdin" in one_line(empty)


def new_key(*options: str) -> tuple[str, str]:
    """`duoserve keys new ...`: (the key it shows once, the entry it prints for the file)."""
    result = duoserve("keys", "new", *options)
    assert result.returncode == 0, result.stderr
    first, intro, *entry = result.stdout.splitlines()
    prefix = "key (shown once, store it now): "
    assert first.startswith(prefix) and intro.startswith("entry for the API keys file")
    return first.removeprefix(prefix), "\n".join(entry) + "\n"


def test_keys_new_prints_a_fresh_key_and_its_entry() -> None:
    key, entry = new_key("--name", "shop", "--models", "digits", "--rate", "50")
    other, _ = new_key()
    assert key != other and len(key) >= 40
    (parsed,) = yaml.safe_load(entry)
    assert parsed == {
        "name": "shop",
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "models": ["digits"],
        "scopes": ["infer"],
        "rate_per_s": 50.0,
        "burst": 50,
    }
    assert key not in entry  # the file holds the digest only
    hashed = duoserve("keys", "hash", stdin=key + "\n")
    assert hashed.stdout.strip() == parsed["sha256"]


# -- serve and compare ------------------------------------------------------------------------


def test_serve_takes_a_keys_file_from_keys_new_and_needs_no_aiohttp(
    tmp_path: Path, model_store: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    key, entry = new_key("--name", "ops", "--models", "digits", "--scopes", "infer,admin")
    plain, plain_entry = new_key("--name", "app", "--models", "digits")
    keys = tmp_path / "keys.yaml"
    keys.write_text(entry + plain_entry)
    config = config_file(
        tmp_path / "models.yaml",
        model_store,
        digits={"routes": [{"backend": "local", "framework": "pytorch", "model": "digits"}]},
    )
    images, labels = digits_samples
    request = tmp_path / "request.json"
    request.write_text(json.dumps(v2_body(images[:1])))
    # As in the gateway image: no load generator, no aiohttp.
    env = {"DUOSERVE_API_KEYS_FILE": str(keys), **hiding(tmp_path, "aiohttp", "duoserve_bench")}
    server = Gateway(config, tmp_path, env=env)
    try:
        server.start()
        infer = f"{server.url}/v2/models/digits/infer"
        assert httpx.post(infer, json=v2_body(images[:1])).status_code == 401
        answer = httpx.post(infer, json=v2_body(images[:1]), headers={"x-api-key": plain})
        assert answer.status_code == 200, answer.text
        assert int(np.argmax(answer.json()["outputs"][0]["data"])) == labels[0]

        compare = ("compare", "digits", str(request), "--url", server.url)
        refused = duoserve(*compare)
        assert refused.returncode == 1 and refused.stdout == ""
        assert one_line(refused).startswith("duoserve compare: HTTP 401:")
        not_admin = duoserve(*compare, env={"DUOSERVE_API_KEY": plain})
        assert not_admin.returncode == 1
        assert "HTTP 403" in one_line(not_admin) and "admin" in one_line(not_admin)
        admin = duoserve(*compare, env={"DUOSERVE_API_KEY": key})
        assert admin.returncode == 0, admin.stderr
        assert re.fullmatch(r"pytorch\s+local\s+[\d.]+ ms", admin.stdout.strip()), admin.stdout
    finally:
        server.stop()


def test_serve_refuses_a_bad_config_or_keys_file_before_it_listens(
    tmp_path: Path, model_store: Path
) -> None:
    bad = config_file(
        tmp_path / "bad.yaml",
        model_store,
        digits={"routes": [{"backend": "nowhere", "framework": "pytorch", "model": "digits"}]},
    )
    serve = ("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--config")
    result = duoserve(*serve, str(bad))
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    good = config_file(
        tmp_path / "good.yaml",
        model_store,
        digits={"routes": [{"backend": "local", "framework": "pytorch", "model": "digits"}]},
    )
    keys = tmp_path / "keys.yaml"
    keys.write_text("- name: x\n  sha256: not-a-digest\n")
    result = duoserve(*serve, str(good), env={"DUOSERVE_API_KEYS_FILE": str(keys)})
    assert result.returncode == 2
    assert "keys.0" in one_line(result) and "sha256" in result.stderr
    # More than one worker: refused with what to do instead, whether by flag or env.
    for flag, env in ((("--workers", "4"), {}), ((), {"DUOSERVE_WORKERS": "2"})):
        result = duoserve(*serve, str(good), *flag, env=env)
        assert result.returncode == 2, result.stderr
        assert "DUOSERVE_WORKERS" in result.stderr and "replicas" in result.stderr
        assert "Traceback" not in result.stderr


def test_compare_shows_both_frameworks_and_how_far_they_agree(
    v2_server: Gateway, tmp_path: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = digits_samples
    request = tmp_path / "request.json"
    request.write_text(json.dumps(v2_body(images[:16])))
    result = duoserve("compare", "digits", str(request), "--url", v2_server.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert re.fullmatch(r"pytorch\s+local\s+[\d.]+ ms", lines[0])
    assert re.fullmatch(r"tensorflow\s+local\s+[\d.]+ ms", lines[1])
    agreement = re.fullmatch(
        r"pytorch vs tensorflow: argmax agreement (\d+)/16, max abs diff (\S+)", lines[2]
    )
    assert agreement is not None, lines[2]
    assert int(agreement.group(1)) == 16 and float(agreement.group(2)) < 1e-4
    unreachable = duoserve(
        "compare", "digits", str(request), "--url", f"http://127.0.0.1:{free_port()}"
    )
    assert unreachable.returncode == 1
    assert one_line(unreachable).startswith("duoserve compare: cannot reach")


def test_rollout_status_shows_phase_gates_and_decisions(tmp_path: Path, model_store: Path) -> None:
    key, entry = new_key("--name", "ops", "--scopes", "infer,admin")
    plain, plain_entry = new_key("--name", "app")
    keys = tmp_path / "keys.yaml"
    keys.write_text(entry + plain_entry)
    rollout = {
        "to": {"backend": "local", "framework": "pytorch", "model": "digits"},
        "start": "2099-01-01T00:00:00Z",  # not yet begun: pending
        "steps": [10, 100],
    }
    tensorflow = [{"backend": "local", "framework": "tensorflow", "model": "digits"}]
    config = config_file(
        tmp_path / "models.yaml",
        model_store,
        digits={"routes": tensorflow, "rollout": rollout},
        plain={"routes": tensorflow},
    )
    server = Gateway(config, tmp_path, env={"DUOSERVE_API_KEYS_FILE": str(keys)})
    try:
        server.start()
        status = ("rollout", "status", "digits", "--url", server.url)
        shown = duoserve(*status, env={"DUOSERVE_API_KEY": key})
        assert shown.returncode == 0, shown.stderr
        first, second = shown.stdout.splitlines()[:2]
        assert re.fullmatch(
            r"digits: rollout [0-9a-f]{12} to pytorch on local \(local gates\)", first
        ), first
        assert "phase pending, step 0 of 2, target serves 0 %" in second
        as_json = duoserve(*status, "--json", env={"DUOSERVE_API_KEY": key})
        assert json.loads(as_json.stdout)["steps"] == [10, 100]
        # Admin scope, like /compare; a model without a rollout is a 404 saying so.
        not_admin = duoserve(*status, env={"DUOSERVE_API_KEY": plain})
        assert not_admin.returncode == 1 and "HTTP 403" in one_line(not_admin)
        none = duoserve("rollout", "status", "plain", "--url", server.url,
                        env={"DUOSERVE_API_KEY": key})  # fmt: skip
        assert none.returncode == 1
        assert one_line(none) == (
            "duoserve rollout status: HTTP 404: model 'plain' has no rollout in models.yaml"
        )
    finally:
        server.stop()
