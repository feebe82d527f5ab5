"""What the V2 backend puts on the wire for a server without the binary tensor extension, and
how it reads V2 servers' error answers (bodies as MLServer 1.7.1 and Triton 2.51 send them;
tests/integration/test_v2_backend.py runs the real servers)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from duoserve.backends.http import server_message, status_error
from duoserve.backends.v2 import V2Backend, error_text
from duoserve.config import V2BackendConfig
from duoserve.errors import BadRequest, NotFound, UpstreamError
from duoserve.tensors import InferenceRequest, RequestedOutput, Tensor


def _backend() -> V2Backend:
    return V2Backend("v2", V2BackendConfig.model_validate({"kind": "v2", "url": "http://v2:8000"}))


def _request(*inputs: Tensor) -> InferenceRequest:
    return InferenceRequest(
        model="m", inputs=list(inputs), id="42", outputs=[RequestedOutput("probabilities")]
    )


def test_json_requests_are_plain_v2_json() -> None:
    pixels = np.arange(6, dtype=np.float32).reshape(2, 3)
    words = np.array([b"caf\xc3\xa9", b"tea"], dtype=object)
    body, headers = _backend().encode(
        _request(Tensor("pixels", pixels, "FP32"), Tensor("words", words, "BYTES")), False
    )
    assert headers == {"Content-Type": "application/json"}
    assert orjson.loads(body) == {
        "id": "42",
        "outputs": [{"name": "probabilities"}],  # no binary_data: JSON answers
        "inputs": [
            {"name": "pixels", "shape": [2, 3], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5]},
            {"name": "words", "shape": [2], "datatype": "BYTES", "data": ["café", "tea"]},
        ],
    }


def test_binary_requests_ask_for_binary_answers() -> None:
    pixels = np.ones((1, 2), dtype=np.float32)
    body, headers = _backend().encode(_request(Tensor("pixels", pixels, "FP32")), True)
    split = int(headers["Inference-Header-Content-Length"])
    header = orjson.loads(body[:split])
    assert header["parameters"] == {"binary_data_output": True}
    assert header["outputs"] == [{"name": "probabilities", "parameters": {"binary_data": True}}]
    assert np.frombuffer(body[split:], dtype="<f4").tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (Tensor("x", np.array([1.0, np.nan], dtype=np.float32), "FP32"), "NaN or infinity"),
        (Tensor("x", np.array([np.inf], dtype=np.float16), "FP16"), "NaN or infinity"),
        (Tensor("x", np.array([b"\xff\xfe"], dtype=object), "BYTES"), "not UTF-8 text"),
    ],
)
def test_what_json_cannot_carry_is_refused_not_changed(tensor: Tensor, words: str) -> None:
    with pytest.raises(BadRequest, match=words) as caught:
        _backend().encode(_request(tensor), False)
    assert "input 'x'" in caught.value.message
    _backend().encode(_request(tensor), True)  # binary carries it as it is


def test_a_fastapi_validation_answer_becomes_one_readable_line() -> None:
    """MLServer's 422 for a bad datatype: the location and the message, never the echoed input
    or pydantic's links."""
    raw = orjson.dumps(
        {
            "detail": [
                {
                    "type": "enum",
                    "loc": ["body", "inputs", 0, "datatype"],
                    "msg": "Input should be 'BOOL', 'FP32' or 'BYTES'",
                    "input": "SECRET-INPUT http://10.0.0.7:9000/x",
                    "ctx": {"expected": "'BOOL', 'FP32' or 'BYTES'"},
                    "url": "https://errors.pydantic.dev/2.14/v/enum",
                },
                {"type": "missing", "loc": ["body", "inputs", 0, "shape"], "msg": "Field required"},
            ]
        }
    )
    text = error_text(raw)
    assert text == (
        "inputs.0.datatype: Input should be 'BOOL', 'FP32' or 'BYTES'; "
        "inputs.0.shape: Field required"
    )
    error = status_error(422, "Open Inference Protocol", "model 'm'", text)
    assert isinstance(error, BadRequest) and error.status == 400
    assert error.message == text


def test_v2_error_answers_lose_server_internals() -> None:
    assert (
        error_text(b'{"error": "mlserver.errors.InferenceError: pixels must be [n, 8, 8]"}')
        == "pixels must be [n, 8, 8]"
    )
    assert error_text(
        b'{"error": "[request id: <id_unknown>] unexpected shape for input \'pixels\'"}'
    ) == ("unexpected shape for input 'pixels'")
    assert error_text(b"Internal Server Error") == ""
    assert error_text(b'{"detail": "Not Found"}') == "Not Found"
    error = status_error(404, "Open Inference Protocol", "model 'nope'", "Model nope not found")
    assert isinstance(error, NotFound) and "Model nope not found" in error.message
    assert isinstance(status_error(500, "Open Inference Protocol", "model 'm'"), UpstreamError)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("cannot load http://10.1.2.3:8000/v2/repo now", "cannot load <url> now"),
        ("peer 10.1.2.3:8001 or [fd00::1]:8001 failed", "peer <address> or <address> failed"),
        ("triton-0.triton.ns.svc:8001 is down", "<address> is down"),
        ("no model in /mnt/models/digits/1", "no model in <path>"),
        ("builtins.ValueError: bad shape", "bad shape"),
        ("KeyError: 'pixels'", "KeyError: 'pixels'"),  # not a module path: kept
        ("expected 8:8 at 12:30", "expected 8:8 at 12:30"),  # not addresses
        ("first line\nTraceback (most recent call last):\n  File ...", "first line"),
    ],
)
def test_server_messages_show_no_addresses_paths_or_tracebacks(text: str, shown: str) -> None:
    assert server_message(text) == shown
