"""A real gateway process plus a real Prometheus scraping it, for the live observability tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from observability_contract import JOB_OF_SOURCE, REPO_ROOT, RULE_FILES

from tests.prometheus_fixture import PrometheusHandle, free_port, start_prometheus

GATEWAY_START_TIMEOUT_S = 180.0  # both runtimes load in-process on a small shared CPU


def infer_body(seed: int) -> dict[str, object]:
    """One digits image: 64 pixels valued 0..16, as the model was trained on."""
    pixels = [float((seed + i) % 17) for i in range(64)]
    return {"inputs": [{"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32", "data": pixels}]}


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_gateway(
    config: Path, workdir: Path, ready_path: str = "/v2/health/ready"
) -> Iterator[str]:
    """`python -m duoserve.cli serve` on 127.0.0.1:<free port>; yields its base URL once
    `ready_path` answers 200 (/v2/health/live where a backend is down on purpose)."""
    port = free_port()
    log_path = workdir / "gateway.log"
    env = {**os.environ, "DUOSERVE_BACKEND_PROBE_INTERVAL_S": "1"}
    command = [sys.executable, "-m", "duoserve.cli", "serve", "--config", str(config)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"gateway exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not ready in {GATEWAY_START_TIMEOUT_S}s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


@contextmanager
def prometheus_scraping(gateway_url: str, workdir: Path) -> Iterator[PrometheusHandle]:
    """Prometheus scraping the gateway every second with the production rules, ready."""
    job = JOB_OF_SOURCE["gateway"]
    prom = start_prometheus(workdir, {job: [gateway_url.removeprefix("http://")]}, RULE_FILES)
    try:
        prom.wait_for_scrapes([job])
        yield prom
    finally:
        prom.stop()


def drive(url: str, models: list[str], seconds: float) -> dict[str, dict[int, int]]:
    """Round-robin V2 infer requests to `models` for `seconds`; status code counts per model."""
    codes: dict[str, dict[int, int]] = {model: {} for model in models}
    deadline = time.monotonic() + seconds
    seed = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            for model in models:
                response = client.post(f"/v2/models/{model}/infer", json=infer_body(seed))
                codes[model][response.status_code] = codes[model].get(response.status_code, 0) + 1
                seed += 1
    return codes


def wait_for(prom: PrometheusHandle, expr: str, series: int, timeout_s: float = 30.0) -> None:
    """Until `expr` has at least `series` results (scrapes and rule evaluations caught up)."""
    deadline = time.monotonic() + timeout_s
    while len(prom.query(expr)) < series:
        if time.monotonic() > deadline:
            pytest.fail(f"{expr} never had {series} series:\n{prom.log_tail()}")
        time.sleep(0.5)
