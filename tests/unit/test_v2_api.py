"""The Open Inference Protocol (V2) REST surface, in-process, on the digits twin models."""

from __future__ import annotations

import gzip
import re
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import GatewayFactory, embedded_config, v2_body

# The embedded backend loads TorchScript; torch deprecates torch.jit.load (not our warning).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

IMAGE = (np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)


def _argmax(doc: dict[str, Any]) -> list[int]:
    (output,) = doc["outputs"]
    return np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1).tolist()


# -- metadata and health ---------------------------------------------------------------------


async def test_server_metadata_and_health(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        server = await client.get("/v2")
        assert server.status_code == 200
        doc = server.json()
        assert doc["name"] == "duoserve"
        assert doc["version"]
        assert "binary_tensor_data" in doc["extensions"]

        live = await client.get("/v2/health/live")
        assert (live.status_code, live.json()) == (200, {"live": True})

        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True
        assert ready.json()["circuits"] == {"local": "closed"}


async def test_model_list_and_metadata(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        models = (await client.get("/v2/models")).json()["models"]
        assert {m["name"]: m["frameworks"] for m in models} == {
            "digits": ["pytorch", "tensorflow"],
            "digits-pytorch": ["pytorch"],
            "digits-tensorflow": ["tensorflow"],
        }
        meta = await client.get("/v2/models/digits")
        assert meta.status_code == 200
        doc = meta.json()
        assert doc["name"] == "digits"
        assert doc["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}]
        assert doc["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
        assert doc["platform"] == "duoserve_pytorch_tensorflow"
        single = (await client.get("/v2/models/digits-tensorflow")).json()
        assert single["platform"] == "tensorflow_savedmodel"
        version = await client.get("/v2/models/digits/versions/1")
        assert version.status_code == 200
        assert version.json()["inputs"] == doc["inputs"]


async def test_metadata_lists_the_served_version(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        doc = (await client.get("/v2/models/digits")).json()
        # ModelConfig.version ("1") is "the version number clients see in metadata".
        assert doc["versions"] == ["1"]


async def test_metadata_of_unknown_version_is_404(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        response = await client.get("/v2/models/digits/versions/7")
        assert response.status_code == 404
        assert "version '7'" in response.json()["error"]


async def test_ready_variants(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        for path in (
            "/v2/models/digits/ready",
            "/v2/models/digits-pytorch/ready",
            "/v2/models/digits/versions/1/ready",
        ):
            response = await client.get(path)
            assert response.status_code == 200, path
            assert response.json()["ready"] is True
        missing_version = await client.get("/v2/models/digits/versions/9/ready")
        assert missing_version.status_code == 503
        assert missing_version.json() == {"name": "digits", "ready": False}
        unknown = await client.get("/v2/models/nope/ready")
        assert unknown.status_code == 404
        assert "unknown model 'nope'" in unknown.json()["error"]


# -- inference -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["digits-pytorch", "digits-tensorflow"])
@pytest.mark.parametrize("path", ["infer", "versions/1/infer"])
async def test_infer_both_frameworks(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray], model: str, path: str
) -> None:
    images, labels = digits_samples
    async with gateway() as (client, _):
        response = await client.post(f"/v2/models/{model}/{path}", json=v2_body(images[:8]))
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["model_name"] == model
        assert doc["model_version"] == "1"
        (output,) = doc["outputs"]
        assert output["name"] == "probabilities"
        assert output["datatype"] == "FP32"
        assert output["shape"] == [8, 10]
        probabilities = np.asarray(output["data"]).reshape(8, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert (probabilities.argmax(axis=1) == labels[:8]).mean() >= 0.75
        framework = model.removeprefix("digits-")
        assert response.headers["x-duoserve-framework"] == framework
        assert response.headers["x-duoserve-backend"] == "local"


async def test_response_headers(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        echoed = await client.post(
            "/v2/models/digits/infer", json=v2_body(IMAGE), headers={"x-request-id": "abc-123"}
        )
        assert echoed.headers["x-request-id"] == "abc-123"
        assert echoed.headers["x-duoserve-framework"] in ("pytorch", "tensorflow")
        assert echoed.headers["x-duoserve-backend"] == "local"
        timing = echoed.headers["server-timing"]
        assert re.fullmatch(r"gateway;dur=[\d.]+, backend;dur=[\d.]+", timing), timing

        generated = await client.post("/v2/models/digits/infer", json=v2_body(IMAGE))
        rid = generated.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        again = await client.post("/v2/models/digits/infer", json=v2_body(IMAGE))
        assert again.headers["x-request-id"] != rid

        # An id that could smuggle anything into logs is replaced, not echoed.
        odd = await client.post(
            "/v2/models/digits/infer", json=v2_body(IMAGE), headers={"x-request-id": "a b<c>"}
        )
        assert odd.headers["x-request-id"] != "a b<c>"

        error = await client.post(
            "/v2/models/nope/infer", json=v2_body(IMAGE), headers={"x-request-id": "err-1"}
        )
        assert error.headers["x-request-id"] == "err-1"


async def test_request_id_in_body_is_echoed(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        response = await client.post(
            "/v2/models/digits/infer", json=v2_body(IMAGE, id="my-request")
        )
        assert response.json()["id"] == "my-request"


@pytest.mark.parametrize("model", ["digits-pytorch", "digits-tensorflow"])
async def test_binary_extension_over_http(gateway: GatewayFactory, model: str) -> None:
    images = np.repeat(IMAGE, 2, axis=0)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [2, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    )
    async with gateway() as (client, _):
        response = await client.post(
            f"/v2/models/{model}/infer",
            content=header + images.tobytes(),
            headers={
                "content-type": "application/octet-stream",
                "inference-header-content-length": str(len(header)),
            },
        )
        assert response.status_code == 200, response.text
        split = int(response.headers["inference-header-content-length"])
        doc = orjson.loads(response.content[:split])
        probabilities = np.frombuffer(response.content[split:], dtype=np.float32).reshape(2, 10)
        assert doc["outputs"][0]["parameters"]["binary_data_size"] == 80
        plain = await client.post(f"/v2/models/{model}/infer", json=v2_body(images))
        expected = np.asarray(plain.json()["outputs"][0]["data"]).reshape(2, 10)
        np.testing.assert_allclose(probabilities, expected, rtol=1e-6)


async def test_frameworks_agree_and_are_accurate(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits_samples
    images, labels = images[:50], labels[:50]
    async with gateway() as (client, _):
        answers = {}
        for framework in ("pytorch", "tensorflow"):
            response = await client.post(
                "/v2/models/digits/infer",
                json=v2_body(images),
                headers={"x-duoserve-framework": framework},
            )
            assert response.status_code == 200
            assert response.headers["x-duoserve-framework"] == framework
            answers[framework] = np.asarray(_argmax(response.json()))
        assert answers["pytorch"].tolist() == answers["tensorflow"].tolist()
        assert (answers["pytorch"] == labels).mean() >= 0.95


async def test_compare_endpoint(gateway: GatewayFactory) -> None:
    images = np.repeat(IMAGE, 3, axis=0)
    images[1] = images[1][::-1]
    async with gateway() as (client, _):
        response = await client.post("/v2/models/digits/compare", json=v2_body(images))
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["model_name"] == "digits"
        results = {r["framework"]: r for r in doc["results"]}
        assert set(results) == {"pytorch", "tensorflow"}
        for result in results.values():
            assert result["backend"] == "local"
            assert result["latency_ms"] >= 0
            assert result["outputs"][0]["shape"] == [3, 10]
        (pair,) = doc["agreement"]
        assert pair["rows"] == 3
        assert pair["argmax_agreement"] == 1.0
        assert pair["max_abs_diff"] < 1e-4


async def test_pin_header(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        for framework in ("tensorflow", "pytorch", "tensorflow"):
            response = await client.post(
                "/v2/models/digits/infer",
                json=v2_body(IMAGE),
                headers={"x-duoserve-framework": framework},
            )
            assert response.headers["x-duoserve-framework"] == framework
        lacking = await client.post(
            "/v2/models/digits-pytorch/infer",
            json=v2_body(IMAGE),
            headers={"x-duoserve-framework": "tensorflow"},
        )
        assert lacking.status_code == 400
        assert "has no tensorflow route" in lacking.json()["error"]
        unknown = await client.post(
            "/v2/models/digits/infer", json=v2_body(IMAGE), headers={"x-duoserve-framework": "jax"}
        )
        assert unknown.status_code == 400
        assert "must be one of pytorch, tensorflow" in unknown.json()["error"]


async def test_route_key_is_sticky(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        served = set()
        for _ in range(6):
            response = await client.post(
                "/v2/models/digits/infer",
                json=v2_body(IMAGE),
                headers={"x-duoserve-route-key": "user-17"},
            )
            served.add(response.headers["x-duoserve-framework"])
        assert len(served) == 1


# -- bad requests ----------------------------------------------------------------------------


def _pixels(**overrides: Any) -> dict[str, Any]:
    tensor = {
        "name": "pixels",
        "shape": [1, 8, 8],
        "datatype": "FP32",
        "data": IMAGE.ravel().tolist(),
    }
    return {"inputs": [{**tensor, **overrides}]}


INFER = "/v2/models/digits/infer"
BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    (
        "malformed-json",
        "POST",
        INFER,
        {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    ("not-an-object", "POST", INFER, {"json": [1, 2, 3]}, 400, "must be a JSON object"),
    (
        "missing-inputs",
        "POST",
        INFER,
        {"json": {"outputs": []}},
        400,
        "'inputs' must be a non-empty list",
    ),
    (
        "unknown-input",
        "POST",
        INFER,
        {"json": _pixels(name="pixel")},
        400,
        "has no input 'pixel'; its inputs are: pixels",
    ),
    (
        "input-twice",
        "POST",
        INFER,
        {"json": {"inputs": _pixels()["inputs"] * 2}},
        400,
        "'pixels' is given twice",
    ),
    (
        "unknown-datatype",
        "POST",
        INFER,
        {"json": _pixels(datatype="FLOAT32")},
        400,
        "unknown datatype 'FLOAT32'",
    ),
    (
        "wrong-datatype",
        "POST",
        INFER,
        {"json": _pixels(datatype="FP64")},
        400,
        "must be FP32, not FP64",
    ),
    (
        "count-vs-shape",
        "POST",
        INFER,
        {"json": _pixels(data=[0.0] * 63)},
        400,
        "data has 63 values but shape [1, 8, 8] needs 64",
    ),
    (
        "shape-vs-signature",
        "POST",
        INFER,
        {"json": _pixels(shape=[1, 64])},
        400,
        "expects [-1, 8, 8]",
    ),
    (
        "strings-in-fp32",
        "POST",
        INFER,
        {"json": _pixels(data=["0"] * 64)},
        400,
        "FP32 data must be numbers, not strings",
    ),
    ("bools-in-fp32", "POST", INFER, {"json": _pixels(data=[True] * 64)}, 400, "not true/false"),
    (
        "too-large-for-fp32",
        "POST",
        INFER,
        {"json": _pixels(data=[1e300] * 64)},
        400,
        "too large for FP32",
    ),
    (
        "unknown-output",
        "POST",
        INFER,
        {"json": {**_pixels(), "outputs": [{"name": "logits"}]}},
        400,
        "has no output 'logits'",
    ),
    (
        "bad-timeout",
        "POST",
        INFER,
        {"json": _pixels(), "headers": {"x-duoserve-timeout-ms": "soon"}},
        400,
        "x-duoserve-timeout-ms",
    ),
    (
        "unknown-model",
        "POST",
        "/v2/models/nope/infer",
        {"json": _pixels()},
        404,
        "unknown model 'nope'",
    ),
    ("unknown-model-metadata", "GET", "/v2/models/nope", {}, 404, "unknown model 'nope'"),
    (
        "unknown-version",
        "POST",
        "/v2/models/digits/versions/7/infer",
        {"json": _pixels()},
        404,
        "no version '7'",
    ),
    (
        "unknown-endpoint",
        "GET",
        "/v2/nothing/here",
        {},
        404,
        "no such endpoint: GET /v2/nothing/here",
    ),
    ("unknown-root-endpoint", "POST", "/infer", {"json": {}}, 404, "no such endpoint"),
    ("wrong-method", "GET", INFER, {}, 405, "Method Not Allowed"),
    ("wrong-method-delete", "DELETE", "/v2/models/digits", {}, 405, "Method Not Allowed"),
    (
        "content-type",
        "POST",
        INFER,
        {"content": b"{}", "headers": {"content-type": "text/plain"}},
        415,
        "content type 'text/plain' is not accepted",
    ),
    (
        "compare-curl-form",  # curl -d without -H 'content-type: application/json'
        "POST",
        "/v2/models/digits/compare",
        {"content": b"{}", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
        "not accepted here; send application/json",
    ),
    (
        "content-encoding",
        "POST",
        INFER,
        {"content": b"{}", "headers": {"content-encoding": "br"}},
        415,
        "content encoding 'br' is not supported",
    ),
    (
        "gzip-garbage",
        "POST",
        INFER,
        {"content": b"not gzip", "headers": {"content-encoding": "gzip"}},
        400,
        "not valid gzip",
    ),
    (
        "gzip-truncated",
        "POST",
        INFER,
        {
            "content": gzip.compress(orjson.dumps(_pixels()))[:-12],
            "headers": {"content-encoding": "gzip"},
        },
        400,
        "truncated",
    ),
    (
        "gzip-bomb",
        "POST",
        INFER,
        {
            "content": gzip.compress(b" " * (8 * 1024 * 1024)),
            "headers": {"content-encoding": "gzip", "content-type": "application/json"},
        },
        413,
        "once decompressed",
    ),
    (
        "binary-header-too-long",
        "POST",
        INFER,
        {"content": b"{}", "headers": {"inference-header-content-length": "99"}},
        400,
        "Inference-Header-Content-Length",
    ),
]


async def _send(client: httpx.AsyncClient, case: tuple[Any, ...]) -> httpx.Response:
    _, method, path, kwargs, _, _ = case
    return await client.request(method, path, **kwargs)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_request_gets_json_error(
    gateway: GatewayFactory, case: tuple[str, str, str, dict[str, Any], int, str]
) -> None:
    _, _, _, _, status, words = case
    async with gateway() as (client, _):
        response = await _send(client, case)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert list(doc) == ["error"]
    assert words in doc["error"]


async def test_body_over_the_limit(gateway: GatewayFactory) -> None:
    body = v2_body(np.repeat(IMAGE, 8, axis=0))
    async with gateway(max_body_bytes=1000) as (client, _):
        response = await client.post(INFER, json=body)
        assert response.status_code == 413
        assert "over the 1000-byte limit" in response.json()["error"]
        # Compression does not get around the limit either.
        squeezed = await client.post(
            INFER,
            content=gzip.compress(orjson.dumps(body)),
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )
        assert squeezed.status_code == 413
        small = await client.post(INFER, json=_pixels())
        assert small.status_code == 200


async def test_chunked_body_over_the_limit(gateway: GatewayFactory) -> None:
    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 500

    async with gateway(max_body_bytes=1000) as (client, _):
        response = await client.post(
            INFER, content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413


async def test_gzip_body_works(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        plain = await client.post("/v2/models/digits-pytorch/infer", json=_pixels())
        zipped = await client.post(
            "/v2/models/digits-pytorch/infer",
            content=gzip.compress(orjson.dumps(_pixels())),
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )
        assert zipped.status_code == 200, zipped.text
        assert zipped.json()["outputs"] == plain.json()["outputs"]


async def test_missing_required_input(gateway: GatewayFactory) -> None:
    pair = {
        "inputs": [
            {"name": "left", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "right", "datatype": "FP32", "shape": [-1, 2]},
        ],
        "outputs": [{"name": "sum", "datatype": "FP32", "shape": [-1, 2]}],
        "routes": [{"backend": "local", "framework": "pytorch"}],
    }
    async with gateway(embedded_config(pair=pair)) as (client, _):
        response = await client.post(
            "/v2/models/pair/infer",
            json={
                "inputs": [{"name": "left", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]
            },
        )
        assert response.status_code == 400
        assert "model 'pair' needs input(s): right" in response.json()["error"]


async def test_good_request_still_served_after_every_bad_one(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits_samples
    async with gateway() as (client, app):
        for case in BAD_REQUESTS:
            response = await _send(client, case)
            assert response.status_code == case[4], case[0]
        for framework in ("pytorch", "tensorflow"):
            response = await client.post(
                INFER, json=v2_body(images[:10]), headers={"x-duoserve-framework": framework}
            )
            assert response.status_code == 200
            assert (np.asarray(_argmax(response.json())) == labels[:10]).mean() >= 0.9
        # Client errors are not backend failures: no circuit opened.
        assert app.state.gateway.dataplane.circuit_states() == {"local": "closed"}


async def test_unknown_input_does_not_leak_internals(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        response = await client.post(INFER, json=_pixels(shape=[1, 8, 9], data=[0.0] * 72))
        assert response.status_code == 400
        error = response.json()["error"]
        assert "Traceback" not in error
        assert "/work" not in error


@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
async def test_deadline_already_spent_is_a_504(gateway: GatewayFactory, framework: str) -> None:
    pin = {"x-duoserve-framework": framework}
    async with gateway() as (client, app):
        by_header = await client.post(
            INFER, json=_pixels(), headers={**pin, "x-duoserve-timeout-ms": "0.001"}
        )
        # Triton's request parameter: microseconds.
        by_parameter = await client.post(
            INFER, json={**_pixels(), "parameters": {"timeout": 1}}, headers=pin
        )
        for response in (by_header, by_parameter):
            assert response.status_code == 504, response.text
            assert "deadline" in response.json()["error"]


@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
async def test_empty_batch_is_answered_alike_and_never_opens_the_circuit(
    gateway: GatewayFactory, framework: str
) -> None:
    empty = _pixels(shape=[0, 8, 8], data=[])
    pin = {"x-duoserve-framework": framework}
    async with gateway() as (client, app):
        answers = []
        for _ in range(6):
            response = await client.post(INFER, json=empty, headers=pin)
            answers.append((response.status_code, response.json().get("error")))
        # Either an empty answer or a 400 naming the problem, the same for both frameworks;
        # never a backend failure that a client can use to open the circuit for everyone.
        assert answers[0][0] in (200, 400), answers
        assert answers == answers[:1] * 6, answers
        if answers[0][0] == 200:
            assert response.json()["outputs"][0]["shape"] == [0, 10]
        assert app.state.gateway.dataplane.circuit_states() == {"local": "closed"}
        served = await client.post(INFER, json=_pixels(), headers=pin)
        assert served.status_code == 200


async def test_health_answers_head_for_probes_that_use_it(gateway: Any) -> None:
    async with gateway() as (client, _):
        for path in ("/v2/health/live", "/v2/health/ready", "/ping"):
            response = await client.head(path)
            assert response.status_code == 200, path
            assert response.content == b"", path
