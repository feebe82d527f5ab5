"""The Open Inference Protocol binary tensor extension, as Triton's own client speaks it.

tritonclient.http against a real gateway socket: binary inputs and outputs give the answer JSON
gives. At the codec level every V2 datatype (FP16 and BYTES included) survives a binary round
trip. And the Content-Type tritonclient sends with a binary body is one the gateway accepts.
"""

from __future__ import annotations

import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from duoserve.codecs.v2 import decode_v2_request, encode_v2_response
from duoserve.config import ModelConfig
from duoserve.frontends.v2 import BINARY_TYPES
from duoserve.tensors import V2_TO_NUMPY, InferenceResponse, Tensor
from tests.servers import Gateway

pytestmark = pytest.mark.integration

import tritonclient.http as tritonhttp  # noqa: E402 - a dev dependency, never skipped


@pytest.fixture(scope="module")
def gateway(pytorch_gateway: Gateway) -> Gateway:
    return pytorch_gateway


def _infer(url: str, images: np.ndarray, binary_in: bool, binary_out: bool) -> np.ndarray:
    client = tritonhttp.InferenceServerClient(url.removeprefix("http://"))
    try:
        pixels = tritonhttp.InferInput("pixels", list(images.shape), "FP32")
        pixels.set_data_from_numpy(images, binary_data=binary_in)
        wanted = tritonhttp.InferRequestedOutput("probabilities", binary_data=binary_out)
        result = client.infer("digits", [pixels], outputs=[wanted])
        answer: np.ndarray = result.as_numpy("probabilities")
        return answer
    finally:
        client.close()


def test_binary_and_json_give_the_same_answer_through_tritonclient(
    gateway: Gateway, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images = digits_samples[0][:5]
    reference = _infer(gateway.url, images, binary_in=False, binary_out=False)
    assert reference.shape == (5, 10) and reference.dtype == np.float32
    np.testing.assert_allclose(reference.sum(axis=1), 1.0, atol=1e-5)
    for binary_in, binary_out in ((True, False), (False, True), (True, True)):
        answer = _infer(gateway.url, images, binary_in, binary_out)
        assert answer.dtype == np.float32
        np.testing.assert_array_equal(answer, reference)


def test_tritonclient_metadata_and_readiness_work(gateway: Gateway) -> None:
    client = tritonhttp.InferenceServerClient(gateway.url.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.is_model_ready("digits")
        meta = client.get_model_metadata("digits")
        assert meta["inputs"][0]["name"] == "pixels"
    finally:
        client.close()


class _Capture(BaseHTTPRequestHandler):
    seen: dict[str, Any] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server's method name
        length = int(self.headers.get("content-length", 0))
        _Capture.seen = {"headers": dict(self.headers), "body": self.rfile.read(length)}
        body = json.dumps(
            {
                "model_name": "digits",
                "outputs": [
                    {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": [1, 10],
                        "data": [0.1] * 10,
                    }
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_content_type_tritonclient_sends_with_binary_data_is_accepted() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        images = np.zeros((1, 8, 8), np.float32)
        _infer(f"http://127.0.0.1:{server.server_port}", images, binary_in=True, binary_out=True)
    finally:
        server.shutdown()
        server.server_close()
    headers = {k.lower(): v for k, v in _Capture.seen["headers"].items()}
    assert int(headers["inference-header-content-length"]) < len(_Capture.seen["body"])
    # tritonclient may send no Content-Type at all (the gateway then reads the body as V2 JSON
    # plus binary); whatever it sends must be one the V2 front door accepts.
    media = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    assert media in BINARY_TYPES


# -- codec: every datatype, binary in and binary out ----------------------------------------

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [7, 8, 9]], np.uint8),
    "UINT16": np.array([[0, 1, 65535], [7, 8, 9]], np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [7, 8, 9]], np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [7, 8, 9]], np.uint64),
    "INT8": np.array([[-128, 0, 127], [1, -1, 2]], np.int8),
    "INT16": np.array([[-32768, 0, 32767], [1, -1, 2]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [1, -1, 2]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [1, -1, 2]], np.int64),
    "FP16": np.array([[0.5, -1.25, 65504.0], [np.inf, -0.0, 1e-4]], np.float16),
    "FP32": np.array([[0.1, -2.5, 3.4e38], [1e-30, -0.0, 7.0]], np.float32),
    "FP64": np.array([[0.1, -2.5, 1.7e308], [5e-324, -0.0, 7.0]], np.float64),
    "BYTES": np.array([[b"", b"a", b"\x00\xff binary"], ["é".encode(), b"xyz", b"q" * 300]]),
}


def _config(datatype: str) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "inputs": [{"name": "x", "datatype": datatype, "shape": [-1, 3]}],
            "outputs": [{"name": "y", "datatype": datatype, "shape": [-1, 3]}],
            "routes": [{"backend": "b", "framework": "pytorch"}],
        }
    )


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.ravel())
    return array.astype(V2_TO_NUMPY[datatype]).tobytes()


def _split_response(payload: bytes, header_length: int) -> tuple[dict[str, Any], bytes]:
    return json.loads(payload[:header_length]), payload[header_length:]


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_every_datatype_round_trips_through_binary_data(datatype: str) -> None:
    array = SAMPLES[datatype]
    if datatype != "BYTES":
        array = array.astype(V2_TO_NUMPY[datatype])
    blob = _raw(array, datatype)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = decode_v2_request(header + blob, "m", None, _config(datatype), str(len(header)))
    decoded = request.inputs[0]
    assert decoded.datatype == datatype and decoded.data.shape == array.shape
    if datatype == "BYTES":
        assert decoded.data.tolist() == array.tolist()
    else:
        assert decoded.data.dtype == V2_TO_NUMPY[datatype]
        np.testing.assert_array_equal(decoded.data, array)

    # The model echoes it as output "y"; the answer carries it as binary data.
    response = InferenceResponse("m", [Tensor("y", decoded.data, datatype)])
    payload, headers = encode_v2_response(response, request, "m")
    assert headers["content-type"] == "application/octet-stream"
    doc, rest = _split_response(payload, int(headers["inference-header-content-length"]))
    (output,) = doc["outputs"]
    assert output["datatype"] == datatype and output["shape"] == list(array.shape)
    assert "data" not in output
    assert output["parameters"]["binary_data_size"] == len(rest) == len(blob)
    assert rest == blob


def test_binary_and_json_inputs_decode_to_the_same_tensor() -> None:
    array = SAMPLES["FP32"]
    blob = array.tobytes()
    binary_header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    as_json = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": array.ravel().tolist()}
            ]
        }
    ).encode()
    config = _config("FP32")
    binary = decode_v2_request(binary_header + blob, "m", None, config, str(len(binary_header)))
    plain = decode_v2_request(as_json, "m", None, config)
    np.testing.assert_array_equal(binary.inputs[0].data, plain.inputs[0].data)


def test_binary_data_output_asks_for_every_output_in_binary() -> None:
    config = _config("FP16")
    body = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP16", "data": [1, 2, 3]}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    request = decode_v2_request(body, "m", None, config)
    values = np.array([[1.5, -2.0, 0.25]], np.float16)
    payload, headers = encode_v2_response(
        InferenceResponse("m", [Tensor("y", values, "FP16")]), request, "m"
    )
    doc, rest = _split_response(payload, int(headers["inference-header-content-length"]))
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 6
    np.testing.assert_array_equal(np.frombuffer(rest, "<f2").reshape(1, 3), values)
