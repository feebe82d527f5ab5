"""Smoke test of a running DuoServe stack: one request per framework through every front door.

    python deploy/smoke.py prepare .smoke        # a throwaway API key for `make smoke`
    python deploy/smoke.py check --api-key-file .smoke/api-key
    python deploy/smoke.py check --url http://127.0.0.1:8000 --api-key KEY \\
        --no-prometheus --no-grafana             # e.g. through `kubectl port-forward svc/gateway`

`check` waits for the gateway, then sends the same 8x8 image of a zero to `digits-pytorch` and
`digits-tensorflow` through the V2, TF Serving and TorchServe front doors and wants ten
probabilities summing to 1 with the largest at index 0, from the framework the model names
(header x-duoserve-framework). It then wants Prometheus scraping the gateway and both backends,
and Grafana healthy. Every check prints one line; any failure exits 1 with what was answered.
`make smoke` runs `prepare`, `make up` and `check`. Standard library only: it runs on any host
with Python 3.9+.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (model, the framework that must answer it)
MODELS = (("digits-pytorch", "pytorch"), ("digits-tensorflow", "tensorflow"))
ZERO = [
    [0, 0, 5, 13, 9, 1, 0, 0],
    [0, 0, 13, 15, 10, 15, 5, 0],
    [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0],
    [0, 5, 8, 0, 0, 9, 8, 0],
    [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0],
    [0, 0, 6, 13, 10, 0, 0, 0],
]
# Prometheus jobs that must be up (deploy/prometheus/prometheus.yml, the ServiceMonitors).
JOBS = ("duoserve-gateway", "torchserve", "tfserving")
# Answers worth waiting out while a stack starts: backends still loading, gateway not ready.
TRANSIENT = {502, 503, 504}


class CheckFailed(Exception):
    """One check failed; the message says what was sent and what came back."""


def call(
    url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one HTTP request; JSON body when given."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


class Transient(Exception):
    """A failure that may pass while the stack starts (connection refused, 502/503/504)."""


def until(deadline: float, attempt: Callable[[], str]) -> str:
    """Run attempt until it returns (its note) or fails for good; a transient failure is
    retried until the deadline, then raised."""
    while True:
        try:
            return attempt()
        except CheckFailed:
            raise
        except (OSError, Transient) as error:
            if time.monotonic() >= deadline:
                raise CheckFailed(str(error) or type(error).__name__) from None
            time.sleep(1.0)
        except Exception as error:  # an answer of the wrong shape: report it, do not crash
            raise CheckFailed(f"{type(error).__name__}: {error}") from None


def _probabilities(door: str, payload: Any) -> list[float]:
    if door == "v2":
        (output,) = payload["outputs"]
        if output["shape"] != [1, 10]:
            raise ValueError(f"output shape {output['shape']}, wanted [1, 10]")
        values = output["data"]
    elif door == "tfserving":
        (values,) = payload["predictions"]
    else:
        (values,) = payload
    return [float(v) for v in values]


def infer(base: str, key: str, door: str, model: str, framework: str) -> Callable[[], str]:
    """One inference through one front door, checked as a user would check the answer."""
    routes = {
        "v2": (
            f"/v2/models/{model}/infer",
            {"inputs": [{"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32", "data": ZERO}]},
        ),
        "tfserving": (f"/v1/models/{model}:predict", {"instances": [ZERO]}),
        "torchserve": (f"/predictions/{model}", [ZERO]),
    }
    path, body = routes[door]

    def attempt() -> str:
        began = time.monotonic()
        status, headers, raw = call(base + path, body, {"Authorization": f"Bearer {key}"})
        took = (time.monotonic() - began) * 1000
        said = raw[:300].decode(errors="replace")
        if status in TRANSIENT:
            raise Transient(f"POST {path}: HTTP {status} {said}")
        if status != 200:
            raise CheckFailed(f"POST {path}: HTTP {status} {said}")
        try:
            probabilities = _probabilities(door, json.loads(raw))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckFailed(f"POST {path}: unexpected answer ({error}): {said}") from None
        served = headers.get("x-duoserve-framework")
        if served != framework:
            raise CheckFailed(f"POST {path}: served by {served!r}, wanted {framework!r}")
        if len(probabilities) != 10 or abs(sum(probabilities) - 1.0) > 1e-3:
            raise CheckFailed(f"POST {path}: not ten probabilities summing to 1: {said}")
        best = max(range(10), key=probabilities.__getitem__)
        if best != 0:
            raise CheckFailed(f"POST {path}: classified the zero as {best}: {said}")
        return f"{took:.0f} ms"

    return attempt


def gateway_ready(base: str) -> Callable[[], str]:
    def attempt() -> str:
        status, _, raw = call(base + "/v2/health/ready")
        if status != 200:
            raise Transient(f"GET /v2/health/ready: HTTP {status} {raw[:200]!r}")
        return "ready"

    return attempt


def prometheus_scrapes(base: str) -> Callable[[], str]:
    def attempt() -> str:
        status, _, raw = call(base + "/api/v1/targets?state=active")
        if status != 200:
            raise Transient(f"GET /api/v1/targets: HTTP {status}")
        targets = json.loads(raw)["data"]["activeTargets"]
        health = {
            job: [t["health"] for t in targets if t["labels"].get("job") == job] for job in JOBS
        }
        down = {
            job: states for job, states in health.items() if not states or set(states) != {"up"}
        }
        if down:
            raise Transient(f"Prometheus targets not all up: {down}")
        return ", ".join(f"{job} up" for job in JOBS)

    return attempt


def grafana_healthy(base: str) -> Callable[[], str]:
    def attempt() -> str:
        status, _, raw = call(base + "/api/health")
        if status != 200 or json.loads(raw).get("database") != "ok":
            raise Transient(f"GET /api/health: HTTP {status} {raw[:200]!r}")
        return "healthy"

    return attempt


def check(args: argparse.Namespace) -> int:
    key = args.api_key or Path(args.api_key_file).read_text().strip()
    base = args.url.rstrip("/")
    deadline = time.monotonic() + args.wait_s
    checks: list[tuple[str, Callable[[], str]]] = [("gateway " + base, gateway_ready(base))]
    for model, framework in MODELS:
        for door in ("v2", "tfserving", "torchserve"):
            checks.append((f"{door:<10} {model}", infer(base, key, door, model, framework)))
    if args.prometheus_url:
        checks.append(("prometheus", prometheus_scrapes(args.prometheus_url.rstrip("/"))))
    if args.grafana_url:
        checks.append(("grafana", grafana_healthy(args.grafana_url.rstrip("/"))))
    failed = 0
    for name, attempt in checks:
        try:
            note = until(deadline, attempt)
        except CheckFailed as error:
            failed += 1
            print(f"FAIL  {name}: {error}", flush=True)
        else:
            print(f"ok    {name} ({note})", flush=True)
    if failed:
        print(f"SMOKE TEST FAILED: {failed} of {len(checks)} checks", file=sys.stderr)
        return 1
    print(f"smoke test passed: {len(checks)} checks")
    return 0


def prepare(args: argparse.Namespace) -> int:
    """A throwaway API key (plaintext, 0600) and its keys file (a digest only, readable by the
    gateway's uid), and an env file for `make smoke`."""
    folder = Path(args.dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = "dsk_" + secrets.token_urlsafe(32)
    key_file = folder / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    keys = folder / "keys.yaml"
    digest = hashlib.sha256(key.encode()).hexdigest()
    keys.write_text(f"keys:\n  - name: smoke\n    sha256: {digest}\n    models: '*'\n")
    keys.chmod(0o644)
    env = folder / "env"
    password = secrets.token_urlsafe(16)
    env.write_text(
        f"GRAFANA_ADMIN_PASSWORD=${{GRAFANA_ADMIN_PASSWORD:-{password}}}\n"
        f"DUOSERVE_API_KEYS_PATH={keys.resolve()}\n"
    )
    env.chmod(0o600)
    print(f"wrote {key_file}, {keys}, {env}")
    return 0


def published_host() -> str:
    """Where compose publishes the gateway, Prometheus and Grafana (DUOSERVE_BIND_ADDRESS)."""
    host = os.environ.get("DUOSERVE_BIND_ADDRESS") or "127.0.0.1"
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def main(argv: list[str] | None = None) -> int:
    host = published_host()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="write a throwaway API key and keys file")
    p.add_argument("dir")
    c = commands.add_parser("check", help="check a running stack")
    c.add_argument("--url", default=os.environ.get("DUOSERVE_URL", f"http://{host}:8000"))
    keys = c.add_mutually_exclusive_group(required=True)
    keys.add_argument("--api-key")
    keys.add_argument("--api-key-file")
    c.add_argument("--prometheus-url", default=f"http://{host}:9090")
    c.add_argument("--no-prometheus", dest="prometheus_url", action="store_const", const="")
    c.add_argument("--grafana-url", default=f"http://{host}:3000")
    c.add_argument("--no-grafana", dest="grafana_url", action="store_const", const="")
    c.add_argument(
        "--wait-s", type=float, default=300.0, help="how long a starting stack may take (300)"
    )
    args = parser.parse_args(argv)
    return prepare(args) if args.command == "prepare" else check(args)


if __name__ == "__main__":
    sys.exit(main())
