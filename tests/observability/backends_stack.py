"""A gateway process in front of real TorchServe and the TF Serving stand-in, for the live tests.

The gateway routes `digits` 50/50 between the two servers, `digits-pytorch` and
`digits-tensorflow` to one each (each shadowed by the other framework), and is driven through
all three of its front doors: V2, TF Serving REST and TorchServe's inference API.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

DIGITS_IO = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}
MODELS = ("digits", "digits-pytorch", "digits-tensorflow")
FRONT_DOORS = ("v2", "tfserving", "torchserve")
ROWS_PER_REQUEST = 2


def write_backends_config(path: Path, torchserve: Any, tfserving: Any) -> Path:
    """models.yaml over TorchServe (token auth) and the stand-in (gRPC, as in production)."""
    on_torchserve = {"backend": "torchserve", "framework": "pytorch", "model": "digits"}
    on_tfserving = {"backend": "tfserving", "framework": "tensorflow", "model": "digits"}
    config = {
        "backends": {
            "torchserve": {
                "kind": "torchserve",
                "url": torchserve.url,
                "token_file": str(torchserve.key_file),
                "timeout_ms": 10_000,
            },
            "tfserving": {
                "kind": "tfserving",
                "protocol": "grpc",
                "grpc": tfserving.grpc_address,
                "url": tfserving.rest_url,
                "timeout_ms": 10_000,
            },
        },
        "models": {
            "digits": {
                **DIGITS_IO,
                "routes": [{**on_torchserve, "weight": 50}, {**on_tfserving, "weight": 50}],
            },
            # Shadowed both ways, so the shadow panels and rule have data for both frameworks.
            "digits-pytorch": {**DIGITS_IO, "routes": [on_torchserve], "shadow": on_tfserving},
            "digits-tensorflow": {**DIGITS_IO, "routes": [on_tfserving], "shadow": on_torchserve},
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def images(seed: int, rows: int = ROWS_PER_REQUEST) -> list[list[list[float]]]:
    """`rows` digits-like images, 8x8 pixels valued 0..16."""
    return [
        [[float((seed + r + 8 * y + x) % 17) for x in range(8)] for y in range(8)]
        for r in range(rows)
    ]


def _call(client: httpx.Client, door: str, model: str, seed: int) -> httpx.Response:
    batch = images(seed)
    if door == "v2":
        flat = [p for image in batch for row in image for p in row]
        body = {"inputs": [{"name": "pixels", "shape": [len(batch), 8, 8], "datatype": "FP32"}]}
        body["inputs"][0]["data"] = flat
        return client.post(f"/v2/models/{model}/infer", json=body)
    if door == "tfserving":
        return client.post(f"/v1/models/{model}:predict", json={"instances": batch})
    return client.post(f"/predictions/{model}", json=batch)


def drive_front_doors(url: str, seconds: float) -> Counter[tuple[str, str, str, int]]:
    """Every model through every front door, round-robin, for `seconds`.

    Returns counts of (front door, model, framework that served, status code).
    """
    served: Counter[tuple[str, str, str, int]] = Counter()
    deadline = time.monotonic() + seconds
    seed = 0
    with httpx.Client(base_url=url, timeout=15) as client:
        while time.monotonic() < deadline:
            for door in FRONT_DOORS:
                for model in MODELS:
                    response = _call(client, door, model, seed)
                    framework = response.headers.get("x-duoserve-framework", "?")
                    served[(door, model, framework, response.status_code)] += 1
                    seed += 1
    return served


def torchserve_not_found(torchserve: Any) -> int:
    """One request for a model TorchServe does not serve, straight to it: its 4xx counter.

    The gateway validates requests before a backend sees them, so no call through it makes
    TorchServe answer 4xx; this gives the "responses by status class" panel a 4xx series.
    """
    request = urllib.request.Request(
        f"{torchserve.url}/predictions/not-served",
        data=json.dumps(images(0, rows=1)).encode(),
        headers={
            "Authorization": f"Bearer {torchserve.inference_key()}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
