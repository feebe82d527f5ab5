"""TorchServe's inference API as a front door: /predictions and /ping, TorchServe's error shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from tests.conftest import GatewayFactory, v2_body

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("model", ["digits-pytorch", "digits-tensorflow", "digits"])
async def test_three_body_forms_give_the_same_probabilities(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray], model: str
) -> None:
    images, labels = digits_samples
    images, labels = images[:5], labels[:5]
    pin = {"x-duoserve-framework": "tensorflow"} if model == "digits" else {}
    async with gateway() as (client, _):
        tensors = await client.post(f"/predictions/{model}", json=v2_body(images), headers=pin)
        named = await client.post(
            f"/predictions/{model}", json={"pixels": images.tolist()}, headers=pin
        )
        bare = await client.post(f"/predictions/{model}", json=images.tolist(), headers=pin)
        for response in (tensors, named, bare):
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
        doc = tensors.json()
        assert doc["model_name"] == model
        (output,) = doc["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == (
            "probabilities",
            "FP32",
            [5, 10],
        )
        from_tensors = np.asarray(output["data"]).reshape(5, 10)
        assert list(named.json()) == ["probabilities"]
        from_named = np.asarray(named.json()["probabilities"])
        from_bare = np.asarray(bare.json())
        assert from_named.shape == from_bare.shape == (5, 10)
        np.testing.assert_array_equal(from_named, from_tensors)
        np.testing.assert_array_equal(from_bare, from_tensors)
        assert (from_bare.argmax(axis=1) == labels).mean() >= 0.8


async def test_version_path(gateway: GatewayFactory) -> None:
    image = np.zeros((1, 8, 8)).tolist()
    async with gateway() as (client, _):
        ok = await client.post("/predictions/digits-pytorch/1", json=image)
        assert ok.status_code == 200
        assert np.asarray(ok.json()).shape == (1, 10)
        missing = await client.post("/predictions/digits-pytorch/4", json=image)
        assert missing.status_code == 404
        assert missing.json()["type"] == "NotFound"
        assert "version '4'" in missing.json()["message"]


BAD: list[tuple[str, str, Any, int, str, str]] = [
    ("not-json", "digits", b"[[1,", 400, "BadRequest", "not valid JSON"),
    ("scalar", "digits", 3, 400, "BadRequest", "send a JSON list"),
    (
        "unknown-name",
        "digits",
        {"image": [[[0.0] * 8] * 8]},
        400,
        "BadRequest",
        "has no input(s) image",
    ),
    ("missing-name", "digits", {}, 400, "BadRequest", "needs input 'pixels'"),
    ("wrong-shape", "digits", [[1.0, 2.0]], 400, "BadRequest", "expects [-1, 8, 8]"),
    ("strings", "digits", [[["x"] * 8] * 8], 400, "BadRequest", "not strings"),
    (
        "tensors-wrong-type",
        "digits",
        {"inputs": [{"name": "pixels", "shape": [1, 8, 8], "datatype": "INT32", "data": [0] * 64}]},
        400,
        "BadRequest",
        "must be FP32, not INT32",
    ),
    ("unknown-model", "nope", [[[0.0] * 8] * 8], 404, "NotFound", "unknown model 'nope'"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
async def test_errors_in_torchserve_shape(
    gateway: GatewayFactory, case: tuple[str, str, Any, int, str, str]
) -> None:
    _, model, body, status, kind, words = case
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with gateway() as (client, _):
        response = await client.post(
            f"/predictions/{model}", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == status, response.text
    doc = response.json()
    assert set(doc) == {"code", "type", "message"}
    assert doc["code"] == status
    assert doc["type"] == kind
    assert words in doc["message"]


async def test_wrong_method_and_path_in_torchserve_shape(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        method = await client.get("/predictions/digits")
        assert method.status_code == 405
        assert method.json()["code"] == 405
        assert set(method.json()) == {"code", "type", "message"}
        too_deep = await client.post("/predictions/digits/1/extra", json=[])
        assert too_deep.status_code == 404
        assert set(too_deep.json()) == {"code", "type", "message"}


async def test_ping(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        response = await client.get("/ping")
        assert response.status_code == 200
        assert response.json() == {"status": "Healthy"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models"),
        ("GET", "/models/digits"),
        ("GET", "/models/digits/all"),
        ("POST", "/models?url=https://example.com/evil.mar"),
        ("PUT", "/models/digits?min_worker=4"),
        ("DELETE", "/models/digits/1"),
        ("GET", "/token"),
        ("POST", "/explanations/digits"),
        ("GET", "/api-description"),
    ],
)
async def test_management_paths_do_not_exist(
    gateway: GatewayFactory, method: str, path: str
) -> None:
    async with gateway() as (client, _):
        response = await client.request(method, path)
    assert response.status_code == 404
    assert "no such endpoint" in response.json()["error"]


async def test_metrics_path_is_the_gateways_own(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert "duoserve_requests_total" in response.text
    assert "ts_inference_requests_total" not in response.text
