"""TF Serving's REST API as a front door, in-process, against both frameworks."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from duoserve.codecs.tfserving import encode_predict
from duoserve.tensors import InferenceResponse, Tensor
from tests.conftest import GatewayFactory, digits_model, embedded_config, v2_body

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

FRAMEWORKS = ["pytorch", "tensorflow"]


def _labelled_config() -> dict[str, Any]:
    """digits-<framework> models that also know the version label stable -> 1."""
    return embedded_config(
        **{
            f"digits-{fw}": digits_model(
                [{"backend": "local", "framework": fw, "model": "digits"}],
                version_labels={"stable": "1"},
            )
            for fw in FRAMEWORKS
        }
    )


async def _v2_probabilities(client: Any, model: str, images: np.ndarray) -> np.ndarray:
    response = await client.post(f"/v2/models/{model}/infer", json=v2_body(images))
    assert response.status_code == 200
    return np.asarray(response.json()["outputs"][0]["data"]).reshape(len(images), 10)


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_predict_forms_agree_with_v2(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray], framework: str
) -> None:
    images, labels = digits_samples
    images, labels = images[:6], labels[:6]
    model = f"digits-{framework}"
    rows = images.tolist()
    async with gateway(_labelled_config()) as (client, _):
        expected = await _v2_probabilities(client, model, images)
        forms = {
            # Row format: answers "predictions", one entry per example; single output -> bare.
            "instances": ({"instances": rows}, "predictions"),
            "instances-named": ({"instances": [{"pixels": r} for r in rows]}, "predictions"),
            # Columnar: answers "outputs", bare value for a single output.
            "inputs": ({"inputs": rows}, "outputs"),
            "inputs-named": ({"inputs": {"pixels": rows}}, "outputs"),
        }
        for name, (body, key) in forms.items():
            response = await client.post(f"/v1/models/{model}:predict", json=body)
            assert response.status_code == 200, (name, response.text)
            assert response.headers["x-duoserve-framework"] == framework
            doc = response.json()
            assert list(doc) == [key], name
            answer = np.asarray(doc[key])
            assert answer.shape == (6, 10), name
            np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-7)
        assert (expected.argmax(axis=1) == labels).mean() >= 0.8


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_versions_and_labels(gateway: GatewayFactory, framework: str) -> None:
    model = f"digits-{framework}"
    body = {"instances": np.zeros((1, 8, 8)).tolist()}
    async with gateway(_labelled_config()) as (client, _):
        plain = await client.post(f"/v1/models/{model}:predict", json=body)
        for path in (f"/v1/models/{model}/versions/1", f"/v1/models/{model}/labels/stable"):
            response = await client.post(f"{path}:predict", json=body)
            assert response.status_code == 200, (path, response.text)
            assert response.json() == plain.json()
        missing = await client.post(f"/v1/models/{model}/versions/3:predict", json=body)
        assert missing.status_code == 404
        assert "version '3'" in missing.json()["error"]
        unlabelled = await client.post(f"/v1/models/{model}/labels/canary:predict", json=body)
        assert unlabelled.status_code == 404
        not_a_number = await client.post(f"/v1/models/{model}/versions/one:predict", json=body)
        assert not_a_number.status_code == 400
        assert "version must be a number" in not_a_number.json()["error"]


async def test_status(gateway: GatewayFactory) -> None:
    available = {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    async with gateway(_labelled_config()) as (client, _):
        for path in (
            "/v1/models/digits-pytorch",
            "/v1/models/digits-tensorflow/versions/1",
            "/v1/models/digits-tensorflow/labels/stable",
        ):
            response = await client.get(path)
            assert response.status_code == 200, path
            assert response.json() == available
        unknown_label = await client.get("/v1/models/digits-pytorch/labels/canary")
        assert unknown_label.status_code == 404
        assert "no version label 'canary'" in unknown_label.json()["error"]
        unknown_model = await client.get("/v1/models/nope")
        assert unknown_model.status_code == 404
        assert "unknown model 'nope'" in unknown_model.json()["error"]


async def test_status_of_a_version_not_served_is_404(gateway: GatewayFactory) -> None:
    # TF Serving answers 404 for a version it does not serve; the gateway must not claim
    # that version is AVAILABLE.
    async with gateway(_labelled_config()) as (client, _):
        response = await client.get("/v1/models/digits-pytorch/versions/7")
        assert response.status_code == 404
        assert "7" in response.json()["error"]


async def test_metadata(gateway: GatewayFactory) -> None:
    async with gateway(_labelled_config()) as (client, _):
        for path in (
            "/v1/models/digits-pytorch/metadata",
            "/v1/models/digits-pytorch/versions/1/metadata",
            "/v1/models/digits-pytorch/labels/stable/metadata",
        ):
            response = await client.get(path)
            assert response.status_code == 200, path
            doc = response.json()
            assert doc["model_spec"] == {
                "name": "digits-pytorch",
                "signature_name": "",
                "version": "1",
            }
            signature = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
            assert signature["method_name"] == "tensorflow/serving/predict"
            pixels = signature["inputs"]["pixels"]
            assert pixels["dtype"] == "DT_FLOAT"
            assert [d["size"] for d in pixels["tensor_shape"]["dim"]] == ["-1", "8", "8"]
            probabilities = signature["outputs"]["probabilities"]
            assert [d["size"] for d in probabilities["tensor_shape"]["dim"]] == ["-1", "10"]
        unknown = await client.get("/v1/models/digits-pytorch/labels/canary/metadata")
        assert unknown.status_code == 404


BAD_PREDICTS: list[tuple[str, str, Any, int, str]] = [
    (
        "both-keys",
        "digits",
        {"instances": [], "inputs": []},
        400,
        "only one of 'inputs' or 'instances'",
    ),
    (
        "neither-key",
        "digits",
        {"signature_name": "serving_default"},
        400,
        "missing 'inputs' or 'instances'",
    ),
    ("not-json", "digits", b"{instances", 400, "JSON Parse error"),
    ("not-an-object", "digits", [1, 2], 400, "must be a JSON object"),
    ("empty-instances", "digits", {"instances": []}, 400, "non-empty list"),
    ("wrong-shape-row", "digits", {"instances": [[1.0, 2.0, 3.0]]}, 400, "expects [-1, 8, 8]"),
    ("wrong-shape-columnar", "digits", {"inputs": [[[1.0] * 8] * 7]}, 400, "expects [-1, 8, 8]"),
    ("ragged", "digits", {"instances": [[[1.0] * 8] * 8, [[1.0] * 8] * 7]}, 400, "ragged"),
    ("strings", "digits", {"inputs": [[["a"] * 8] * 8]}, 400, "not strings"),
    (
        "unknown-named-input",
        "digits",
        {"inputs": {"pixels": [[[0.0] * 8] * 8], "extra": 1}},
        400,
        "has no input(s) extra",
    ),
    (
        "missing-named-input",
        "digits",
        {"inputs": {"image": [[[0.0] * 8] * 8]}},
        400,
        "missing named input 'pixels'",
    ),
    (
        "named-row-wrong-keys",
        "digits",
        {"instances": [{"image": [[0.0] * 8] * 8}]},
        400,
        "exactly the keys: pixels",
    ),
    ("unknown-model", "nope", {"instances": [[[0.0] * 8] * 8]}, 404, "unknown model 'nope'"),
]


@pytest.mark.parametrize("case", BAD_PREDICTS, ids=[c[0] for c in BAD_PREDICTS])
async def test_bad_predict_gets_error_json(
    gateway: GatewayFactory, case: tuple[str, str, Any, int, str]
) -> None:
    _, model, body, status, words = case
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with gateway() as (client, _):
        response = await client.post(
            f"/v1/models/{model}:predict",
            content=content,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == status, response.text
    doc = response.json()
    assert list(doc) == ["error"]
    assert words in doc["error"]


async def test_classify_and_regress_are_refused(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        for verb in ("classify", "regress"):
            response = await client.post(f"/v1/models/digits:{verb}", json={"examples": []})
            assert response.status_code == 400
            assert f":{verb}" in response.json()["error"]


async def test_too_many_instances(gateway: GatewayFactory) -> None:
    config = embedded_config(
        small=digits_model(
            [{"backend": "local", "framework": "pytorch", "model": "digits"}], max_batch=2
        )
    )
    async with gateway(config) as (client, _):
        body = {"instances": np.zeros((3, 8, 8)).tolist()}
        response = await client.post("/v1/models/small:predict", json=body)
        assert response.status_code == 400
        assert "at most 2" in response.json()["error"]


# -- codec shapes for models with several outputs (no such model in the store) ---------------


def _two_outputs() -> InferenceResponse:
    return InferenceResponse(
        model_name="m",
        outputs=[
            Tensor.from_array("scores", np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)),
            Tensor.from_array("classes", np.array([1, 0], np.int64)),
        ],
    )


def test_row_answer_with_several_outputs_is_one_object_per_row() -> None:
    doc = orjson.loads(encode_predict(_two_outputs(), "row"))
    assert doc == {
        "predictions": [
            {"classes": 1, "scores": [0.25, 0.75]},
            {"classes": 0, "scores": [1.0, 0.0]},
        ]
    }


def test_columnar_answer_with_several_outputs_is_keyed_by_name() -> None:
    doc = orjson.loads(encode_predict(_two_outputs(), "columnar"))
    assert doc == {"outputs": {"classes": [1, 0], "scores": [[0.25, 0.75], [1.0, 0.0]]}}


def test_bytes_outputs_named_bytes_travel_as_b64() -> None:
    words = np.empty(2, dtype=object)
    words[:] = [b"\xff\x00", b"ok"]
    response = InferenceResponse(model_name="m", outputs=[Tensor.from_array("raw_bytes", words)])
    assert orjson.loads(encode_predict(response, "columnar")) == {
        "outputs": [{"b64": "/wA="}, {"b64": "b2s="}]
    }
