"""TorchServeBackend's wire choices against a scripted TorchServe: binary tensors by default,
and JSON once a handler that reads JSON only has refused the bytes."""

from __future__ import annotations

import json

import numpy as np

from duoserve.backends.torchserve import TorchServeBackend
from duoserve.config import TorchServeBackendConfig
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, Tensor
from tests.unit.test_httpclient import ok, scripted

ANSWER = json.dumps(
    {"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10],
                  "data": [0.0] * 9 + [1.0]}]}
).encode()  # fmt: skip


def request() -> InferenceRequest:
    pixels = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    return InferenceRequest(model="digits", inputs=[Tensor("pixels", pixels, "FP32")])


def backend(url: str, **extra: object) -> TorchServeBackend:
    return TorchServeBackend(
        "ts", TorchServeBackendConfig.model_validate({"kind": "torchserve", "url": url, **extra})
    )


async def test_inputs_go_as_binary_tensors_by_default() -> None:
    async with scripted(lambda *a: ok(ANSWER)) as (server, url):
        ts = backend(url)
        answer = await ts.infer(request(), Deadline(2))
        assert int(np.argmax(answer.outputs[0].data)) == 9
        method, target, headers, body = server.requests[0]
        assert (method, target) == ("POST", "/predictions/digits")
        assert headers["content-type"] == "application/octet-stream"
        split = int(headers["inference-header-content-length"])
        header = json.loads(body[:split])
        assert header["inputs"][0]["parameters"]["binary_data_size"] == 64 * 4
        sent = np.frombuffer(body[split:], dtype="<f4").reshape(1, 8, 8)
        np.testing.assert_array_equal(sent, request().inputs[0].data)
        await ts.close()


async def test_a_json_only_handler_gets_json_after_refusing_bytes_once() -> None:
    refusal = json.dumps(
        {"code": 400, "type": "BadRequest", "message": "request body is not UTF-8 text; send JSON"}
    ).encode()

    def old_handler(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        if headers["content-type"] == "application/octet-stream":
            return ok(refusal).replace(b"200 OK", b"400 Bad Request", 1)
        assert json.loads(body)["inputs"][0]["data"] == list(range(64))
        return ok(ANSWER)

    async with scripted(old_handler) as (server, url):
        ts = backend(url)
        for _ in range(3):
            answer = await ts.infer(request(), Deadline(2))
            assert int(np.argmax(answer.outputs[0].data)) == 9
        types = [headers["content-type"] for _, _, headers, _ in server.requests]
        assert types == ["application/octet-stream"] + ["application/json"] * 3
        await ts.close()


async def test_binary_tensors_false_sends_json() -> None:
    async with scripted(lambda *a: ok(ANSWER)) as (server, url):
        ts = backend(url, binary_tensors=False)
        await ts.infer(request(), Deadline(2))
        assert server.requests[0][2]["content-type"] == "application/json"
        await ts.close()
