"""Below a root path over a real socket: `duoserve serve --root-path /ml` reached through a proxy
that forwards the prefix and through one that strips it, and `uvicorn --root-path /ml` (its
own semantics: the proxy must strip the prefix). API keys keep their per-model grants and the
admin scope on every front door, errors keep each front door's shape, readiness turns 503 on
SIGTERM, and the OpenAPI schema names the prefix.

The models run on the embedded PyTorch runtime only, so the gateways start quickly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from duoserve.auth import hash_key
from tests.conftest import DIGITS_IO, v2_body
from tests.servers import REPO, VENV_BIN, free_port, http_get, stop_group, wait_until

pytestmark = pytest.mark.integration

ROOT = "/ml"
ROWS = ((np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)).tolist()
ADMIN, APP = "dsk_admin-key", "dsk_app-key"
TS_SHAPE, ERROR_SHAPE = {"code", "type", "message"}, {"error"}


def _workdir(tmp_path: Path, model_store: Path) -> dict[str, str]:
    """models.yaml (`digits` and `other`, both PyTorch) and a keys file; the gateway's env."""
    route = [{"backend": "local", "framework": "pytorch", "model": "digits"}]
    config = tmp_path / "models.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backends": {"local": {"kind": "embedded", "model_store": str(model_store)}},
                "models": {name: {**DIGITS_IO, "routes": route} for name in ("digits", "other")},
            }
        )
    )
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            [
                {"name": "ops", "sha256": hash_key(ADMIN), "scopes": ["admin"]},
                {"name": "app", "sha256": hash_key(APP), "models": ["digits"]},
            ]
        )
    )
    return {
        "DUOSERVE_CONFIG": str(config),
        "DUOSERVE_API_KEYS_FILE": str(keys),
        "DUOSERVE_DRAIN_DELAY_S": "60",  # readiness stays 503 while the test looks
        "DUOSERVE_LOG_LEVEL": "warning",
    }


# (launcher, the command after the port, the prefixes clients may send)
LAUNCHERS = {
    "duoserve-serve": (["duoserve", "serve", "--root-path", ROOT], [ROOT, ""]),
    "uvicorn": (
        ["uvicorn", "duoserve.app:create_app", "--factory", "--root-path", ROOT],
        [""],
    ),
}


@pytest.fixture(params=list(LAUNCHERS))
def server(
    request: pytest.FixtureRequest, tmp_path: Path, model_store: Path
) -> Iterator[tuple[str, list[str], subprocess.Popen[bytes]]]:
    """A gateway below /ml on a free port: (url, prefixes clients may send, process)."""
    command, prefixes = LAUNCHERS[request.param]
    env = {**os.environ, **_workdir(tmp_path, model_store)}
    port = free_port()
    if command[0] == "duoserve":
        argv = [str(VENV_BIN / "duoserve"), *command[1:], "--host", "127.0.0.1", "--port"]
    else:
        argv = [str(VENV_BIN / "uvicorn"), *command[1:], "--host", "127.0.0.1", "--port"]
    log = tmp_path / "gateway.out"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*argv, str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # A probe calling the pod directly: no prefix.
        wait_until(
            lambda: http_get(url + "/v2/health/ready")[0] == 200, 120, "the gateway", proc, log
        )
        yield url, prefixes, proc
    finally:
        stop_group(proc)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _check_below(client: httpx.Client, prefix: str, body: dict[str, Any]) -> None:
    """Keys, error shapes and the schema, for paths sent with ``prefix`` before them."""

    def call(method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = _bearer(key) if key else {}
        return client.request(method, prefix + path, headers=headers, **kw)

    where = prefix or "(stripped)"
    ok = call("POST", "/v2/models/digits/infer", APP, json=body)
    assert ok.status_code == 200, (where, ok.text)
    assert call("POST", "/predictions/digits", APP, json=ROWS).status_code == 200
    assert call("GET", "/v1/models/digits/metadata", APP).status_code == 200

    # A key for `digits` cannot call `other`, on any front door, in its shape.
    for method, path, payload, shape in [
        ("POST", "/v2/models/other/infer", body, ERROR_SHAPE),
        ("GET", "/v2/models/other", None, ERROR_SHAPE),
        ("POST", "/v1/models/other:predict", {"instances": ROWS}, ERROR_SHAPE),
        ("GET", "/v1/models/other/metadata", None, ERROR_SHAPE),
        ("POST", "/predictions/other", ROWS, TS_SHAPE),
    ]:
        denied = call(method, path, APP, json=payload)
        assert denied.status_code == 403, (where, path, denied.text)
        assert set(denied.json()) == shape, (where, path)
    unauthorized = call("POST", "/predictions/digits", json=ROWS)
    assert unauthorized.status_code == 401 and set(unauthorized.json()) == TS_SHAPE

    # compare needs the admin scope.
    refused = call("POST", "/v2/models/digits/compare", APP, json=body)
    assert refused.status_code == 403 and "admin" in refused.json()["error"]
    compared = call("POST", "/v2/models/other/compare", ADMIN, json=body)
    assert compared.status_code == 200, (where, compared.text)

    # Errors from FastAPI's router keep the front door's shape too.
    missing = call("POST", "/predictions/digits/1/extra", APP, json=ROWS)
    assert missing.status_code == 404 and set(missing.json()) == TS_SHAPE

    schema = call("GET", "/openapi.json", APP)
    assert schema.status_code == 200
    assert schema.json()["servers"] == [{"url": ROOT}]


def test_keys_errors_drain_and_schema_below_the_root_path(
    server: tuple[str, list[str], subprocess.Popen[bytes]],
) -> None:
    url, prefixes, proc = server
    body = v2_body(np.array(ROWS, dtype=np.float32))
    with httpx.Client(base_url=url, timeout=30) as client:
        for prefix in prefixes:
            _check_below(client, prefix, body)

        if prefixes == [""]:
            # uvicorn --root-path: the path it hands on is always the prefix plus what came, so
            # a proxy that forwards the prefix reaches nothing (duoserve serve takes both).
            doubled = client.post(ROOT + "/v2/models/digits/infer", json=body, headers=_bearer(APP))
            assert doubled.status_code == 404

        # SIGTERM: readiness below the root path turns 503 at once; requests are still served.
        os.kill(proc.pid, signal.SIGTERM)
        ready = prefixes[0] + "/v2/health/ready"
        deadline = time.monotonic() + 10
        while client.get(ready).status_code != 503:
            assert time.monotonic() < deadline, "readiness did not turn 503 after SIGTERM"
            time.sleep(0.05)
        for prefix in prefixes:
            answer = client.get(prefix + "/v2/health/ready")
            assert answer.status_code == 503 and answer.json()["draining"] is True
            ping = client.get(prefix + "/ping")
            assert ping.status_code == 503
            assert ping.json() == {"status": "Unhealthy", "draining": True}
            served = client.post(
                prefix + "/v2/models/digits/infer", json=body, headers=_bearer(APP)
            )
            assert served.status_code == 200 and served.headers["connection"] == "close"


def test_a_root_path_that_hides_the_gateways_paths_is_refused_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(VENV_BIN / "duoserve"), "serve", "--root-path", "/v2", "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "/v2 is one of the gateway's own paths" in done.stderr
