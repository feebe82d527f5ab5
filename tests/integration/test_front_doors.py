"""Every front door x every backend kind classifies the same digits the same way.

Backends are real: TorchServe (Java, token auth), the TF Serving stand-in over gRPC and REST,
a V2 server on a socket, and the embedded runtimes. The gateway runs in-process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.conftest import DIGITS_IO, v2_body

pytestmark = pytest.mark.integration

ROUTES = {
    "embedded-pytorch": {"backend": "local", "framework": "pytorch", "model": "digits"},
    "embedded-tensorflow": {"backend": "local", "framework": "tensorflow", "model": "digits"},
    "torchserve": {"backend": "torchserve", "framework": "pytorch", "model": "digits"},
    "torchserve-json": {"backend": "torchserve-json", "framework": "pytorch", "model": "digits"},
    "tfserving-grpc": {"backend": "tfs-grpc", "framework": "tensorflow", "model": "digits"},
    "tfserving-rest": {"backend": "tfs-rest", "framework": "tensorflow", "model": "digits"},
    "v2": {"backend": "v2", "framework": "pytorch", "model": "digits-pytorch"},
}


@pytest.fixture(scope="module")
def matrix_config(torchserve: Any, tfserving: Any, v2_server: Any, model_store: Any) -> dict:
    return {
        "backends": {
            "local": {"kind": "embedded", "model_store": str(model_store)},
            "torchserve": {
                "kind": "torchserve",
                "url": torchserve.url,
                "token_file": str(torchserve.key_file),
            },
            # Inputs as JSON lists instead of the binary tensor extension (the default).
            "torchserve-json": {
                "kind": "torchserve",
                "url": torchserve.url,
                "token_file": str(torchserve.key_file),
                "binary_tensors": False,
            },
            "tfs-grpc": {"kind": "tfserving", "protocol": "grpc", "grpc": tfserving.grpc_address},
            "tfs-rest": {"kind": "tfserving", "protocol": "rest", "url": tfserving.rest_url},
            "v2": {"kind": "v2", "url": v2_server.url},
        },
        "models": {name: {**DIGITS_IO, "routes": [route]} for name, route in ROUTES.items()},
    }


async def _v2(client: Any, model: str, images: np.ndarray) -> tuple[np.ndarray, Any]:
    response = await client.post(f"/v2/models/{model}/infer", json=v2_body(images))
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "probabilities" and output["shape"] == [len(images), 10]
    return np.array(output["data"], dtype=np.float32).reshape(-1, 10), response


async def _tfserving(client: Any, model: str, images: np.ndarray) -> tuple[np.ndarray, Any]:
    response = await client.post(f"/v1/models/{model}:predict", json={"instances": images.tolist()})
    assert response.status_code == 200, response.text
    return np.array(response.json()["predictions"], dtype=np.float32), response


async def _torchserve(client: Any, model: str, images: np.ndarray) -> tuple[np.ndarray, Any]:
    response = await client.post(f"/predictions/{model}", json=images.tolist())
    assert response.status_code == 200, response.text
    return np.array(response.json(), dtype=np.float32), response


FRONT_DOORS = {"v2": _v2, "tfserving": _tfserving, "torchserve": _torchserve}


@pytest.mark.parametrize("front_door", list(FRONT_DOORS))
async def test_every_backend_answers_every_front_door_alike(
    gateway: Any, matrix_config: dict, digits_samples: Any, front_door: str
) -> None:
    images, labels = digits_samples
    batch = images[:40]
    async with gateway(matrix_config) as (client, _):
        reference, _ = await _v2(client, "embedded-pytorch", batch)
        for model, route in ROUTES.items():
            probabilities, response = await FRONT_DOORS[front_door](client, model, batch)
            assert response.headers["x-duoserve-framework"] == route["framework"], model
            assert response.headers["x-duoserve-backend"] == route["backend"], model
            assert probabilities.shape == (40, 10), model
            np.testing.assert_array_equal(
                probabilities.argmax(axis=1), reference.argmax(axis=1), err_msg=model
            )
            np.testing.assert_allclose(probabilities, reference, atol=1e-4, err_msg=model)
        assert (reference.argmax(axis=1) == labels[:40]).mean() >= 0.95


async def test_backend_failures_map_to_gateway_errors(
    gateway: Any, matrix_config: dict, digits_samples: Any
) -> None:
    """Bad input rejected by each backend is the client's 400; unknown backend models 404."""
    images, _ = digits_samples
    config = {
        **matrix_config,
        "models": {
            **matrix_config["models"],
            "missing-on-torchserve": {
                **DIGITS_IO,
                "routes": [{"backend": "torchserve", "framework": "pytorch", "model": "nope"}],
            },
            "missing-on-tfserving": {
                **DIGITS_IO,
                "routes": [{"backend": "tfs-grpc", "framework": "tensorflow", "model": "nope"}],
            },
        },
    }
    async with gateway(config) as (client, _):
        for model in ("missing-on-torchserve", "missing-on-tfserving"):
            response = await client.post(f"/v2/models/{model}/infer", json=v2_body(images[:1]))
            assert response.status_code == 404, response.text
            assert "nope" in response.json()["error"]
        # A version the backend lacks is the client's 404, in every backend kind.
        for model in ("torchserve", "tfserving-grpc", "embedded-pytorch"):
            response = await client.post(
                f"/v2/models/{model}/versions/7/infer", json=v2_body(images[:1])
            )
            assert response.status_code == 404, (model, response.text)
            assert "127.0.0.1" not in response.text
