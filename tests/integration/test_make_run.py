"""`make run` as a user runs it: the real command, a real socket, the README's digit."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.servers import REPO, free_port, http_get, stop_group, wait_until

pytestmark = pytest.mark.integration

# sklearn's digits.images[0], a zero: the README's curl example.
ZERO = [
    0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0,
    0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0,
    0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0,
]  # fmt: skip


def _post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[dict, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
        return json.loads(response.read()), dict(response.headers)


def test_make_run_serves_and_classifies_a_digit_with_both_frameworks(
    model_store: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "make-run.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["make", "run", f"PORT={port}"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MAKEFLAGS": ""},
        )
    try:
        wait_until(
            lambda: http_get(base + "/v2/health/ready")[0] == 200, 300, "make run", proc, log
        )
        body = {
            "inputs": [{"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32", "data": ZERO}]
        }
        for framework in ("pytorch", "tensorflow"):
            answer, headers = _post(
                f"{base}/v2/models/digits/infer", body, {"x-duoserve-framework": framework}
            )
            assert headers["x-duoserve-framework"] == framework
            probabilities = answer["outputs"][0]["data"]
            assert max(range(10), key=probabilities.__getitem__) == 0
            assert probabilities[0] > 0.5
        # Unpinned, the 50/50 split reaches both frameworks.
        served = {
            _post(f"{base}/v2/models/digits/infer", body)[1]["x-duoserve-framework"]
            for _ in range(40)
        }
        assert served == {"pytorch", "tensorflow"}
        rows = [ZERO[i : i + 8] for i in range(0, 64, 8)]
        answer, _ = _post(f"{base}/v1/models/digits-tensorflow:predict", {"instances": [rows]})
        assert max(range(10), key=answer["predictions"][0].__getitem__) == 0
        answer, _ = _post(f"{base}/predictions/digits-pytorch", [rows])
        assert max(range(10), key=answer[0].__getitem__) == 0
    finally:
        stop_group(proc)
    assert proc.returncode is not None
