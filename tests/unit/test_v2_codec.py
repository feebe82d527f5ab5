"""The V2 codec: decode_v2_request / encode_v2_response for every datatype, JSON and binary."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from duoserve.codecs import v2 as v2_codec
from duoserve.codecs.v2 import binary_bytes, decode_v2_request, encode_v2_response
from duoserve.config import ModelConfig
from duoserve.errors import BadRequest
from duoserve.tensors import (
    V2_TO_NUMPY,
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    Tensor,
)

DATATYPES = list(V2_TO_NUMPY)
# Two rows of three values each that fit every datatype of their family.
SAMPLE: dict[str, list[Any]] = {
    "BOOL": [True, False, True, False, False, True],
    "BYTES": ["a", "bc", "", "déf", "g", "h"],
    **{d: [0, 1, 2, 3, 4, 5] for d in DATATYPES if d.startswith(("INT", "UINT"))},
    **{d: [0.5, -1.5, 2.0, 3.25, -4.0, 5.5] for d in ("FP16", "FP32", "FP64")},
}


def _name(datatype: str) -> str:
    return f"in_{datatype.lower()}"


ALL_TYPES = ModelConfig.model_validate(
    {
        "inputs": [{"name": _name(d), "datatype": d, "shape": [-1, 3]} for d in DATATYPES],
        "outputs": [{"name": "a", "datatype": "FP32", "shape": [-1]}],
        "routes": [{"backend": "b", "framework": "pytorch"}],
        "max_batch": 4,
    }
)
DIGITS = ModelConfig.model_validate(
    {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
        "routes": [{"backend": "b", "framework": "pytorch"}],
        "max_batch": 16,
    }
)


def _expected(datatype: str) -> np.ndarray:
    values = SAMPLE[datatype]
    if datatype == "BYTES":
        array = np.empty(6, dtype=object)
        array[:] = [v.encode() for v in values]
        return array.reshape(2, 3)
    return np.array(values, dtype=V2_TO_NUMPY[datatype]).reshape(2, 3)


def _decode(doc: dict[str, Any], config: ModelConfig = ALL_TYPES, **kw: Any) -> InferenceRequest:
    return decode_v2_request(orjson.dumps(doc), "m", None, config, **kw)


def _bad(doc: dict[str, Any] | bytes, config: ModelConfig = ALL_TYPES, **kw: Any) -> str:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    with pytest.raises(BadRequest) as caught:
        decode_v2_request(body, "m", None, config, **kw)
    assert caught.value.status == 400
    return caught.value.message


# -- decoding JSON -------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_decode_every_datatype(datatype: str, nested: bool) -> None:
    data: list[Any] = SAMPLE[datatype]
    if nested:
        data = [data[:3], data[3:]]
    request = _decode(
        {"inputs": [{"name": _name(datatype), "shape": [2, 3], "datatype": datatype, "data": data}]}
    )
    (tensor,) = request.inputs
    assert tensor.name == _name(datatype)
    assert tensor.datatype == datatype
    assert tensor.data.dtype == V2_TO_NUMPY[datatype]
    assert tensor.data.shape == (2, 3)
    assert tensor.data.tolist() == _expected(datatype).tolist()


def test_decode_keeps_id_version_and_parameters() -> None:
    doc = {
        "id": "req-42",
        "parameters": {"custom": "x", "priority": 2},
        "inputs": [
            {
                "name": "in_fp32",
                "shape": [1, 3],
                "datatype": "FP32",
                "parameters": {"note": "kept"},
                "data": [1, 2, 3],
            }
        ],
        "outputs": [{"name": "a", "parameters": {"binary_data": True}}],
    }
    request = decode_v2_request(orjson.dumps(doc), "m", "3", ALL_TYPES)
    assert request.id == "req-42"
    assert request.version == "3"
    assert request.model == "m"
    assert request.parameters == {"custom": "x", "priority": 2}
    assert request.inputs[0].parameters == {"note": "kept"}
    assert request.outputs == [RequestedOutput("a", {"binary_data": True})]


# -- decoding the binary extension -----------------------------------------------------------


def _binary_body(doc: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, str]:
    header = orjson.dumps(doc)
    return header + b"".join(blobs), str(len(header))


@pytest.mark.parametrize("datatype", DATATYPES)
def test_decode_binary_every_datatype(datatype: str) -> None:
    blob = binary_bytes(_expected(datatype))
    body, length = _binary_body(
        {
            "inputs": [
                {
                    "name": _name(datatype),
                    "shape": [2, 3],
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        },
        [blob],
    )
    request = decode_v2_request(body, "m", None, ALL_TYPES, header_length=length)
    (tensor,) = request.inputs
    assert tensor.data.shape == (2, 3)
    assert tensor.data.tolist() == _expected(datatype).tolist()
    # binary_data_size describes the wire, not the tensor: it is not passed on.
    assert "binary_data_size" not in tensor.parameters


def test_decode_mixed_binary_and_json_inputs_in_order() -> None:
    first = binary_bytes(_expected("INT16"))
    second = binary_bytes(_expected("BYTES"))
    body, length = _binary_body(
        {
            "inputs": [
                {
                    "name": "in_int16",
                    "shape": [2, 3],
                    "datatype": "INT16",
                    "parameters": {"binary_data_size": len(first)},
                },
                {"name": "in_fp64", "shape": [2, 3], "datatype": "FP64", "data": SAMPLE["FP64"]},
                {
                    "name": "in_bytes",
                    "shape": [2, 3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(second)},
                },
            ]
        },
        [first, second],
    )
    request = decode_v2_request(body, "m", None, ALL_TYPES, header_length=length)
    assert [t.name for t in request.inputs] == ["in_int16", "in_fp64", "in_bytes"]
    assert request.inputs[0].data.tolist() == _expected("INT16").tolist()
    assert request.inputs[1].data.tolist() == _expected("FP64").tolist()
    assert request.inputs[2].data.tolist() == _expected("BYTES").tolist()


def test_header_length_beyond_body() -> None:
    body = orjson.dumps({"inputs": []})
    message = _bad(body, header_length=str(len(body) + 1))
    assert "Inference-Header-Content-Length" in message


def test_header_length_not_a_number() -> None:
    assert "Inference-Header-Content-Length" in _bad(b"{}", header_length="-3")


def test_binary_size_not_matching_shape() -> None:
    blob = np.zeros(5, dtype=np.float32).tobytes()
    body, length = _binary_body(
        {
            "inputs": [
                {
                    "name": "in_fp32",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        },
        [blob],
    )
    message = _bad(body, header_length=length)
    assert "20 bytes of binary data" in message
    assert "needs 24" in message


def test_binary_size_past_the_body() -> None:
    body, length = _binary_body(
        {
            "inputs": [
                {
                    "name": "in_fp32",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 24},
                }
            ]
        },
        [b"\x00" * 8],
    )
    assert "runs past the end of the body" in _bad(body, header_length=length)


def test_unclaimed_trailing_bytes() -> None:
    blob = np.zeros(6, dtype=np.float32).tobytes()
    body, length = _binary_body(
        {
            "inputs": [
                {
                    "name": "in_fp32",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        },
        [blob, b"junk"],
    )
    assert "4 bytes of binary data no input claims" in _bad(body, header_length=length)


def test_binary_bytes_element_count_mismatch() -> None:
    blob = struct.pack("<I", 1) + b"a"
    body, length = _binary_body(
        {
            "inputs": [
                {
                    "name": "in_bytes",
                    "shape": [1, 3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        },
        [blob],
    )
    assert "ends early" in _bad(body, header_length=length)


# -- shape and size errors -------------------------------------------------------------------


def _single(shape: Any, data: Any, datatype: str = "FP32", name: str = "in_fp32") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    "shape",
    [[2, -3], [-1, 3], [1] * 17, "2x3", [2.0, 3], [True, 3], None],
    ids=["negative", "minus-one", "17-dims", "string", "float", "bool", "missing"],
)
def test_bad_shapes(shape: Any) -> None:
    message = _bad(_single(shape, SAMPLE["FP32"]))
    assert "shape must be a list of at most 16 non-negative integers" in message
    assert "'in_fp32'" in message


def test_sixteen_dims_is_a_shape() -> None:
    # Not refused as a shape: the count check that follows is what fails.
    message = _bad(_single([1] * 16, [1.0, 2.0]))
    assert "data has 2 values but shape" in message


def test_element_count_above_the_model_bound_is_checked_before_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_build(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("an array was built for an oversized input")

    monkeypatch.setattr(v2_codec, "array_from_json", must_not_build)
    # 17 rows of 8x8 where the model takes at most 16.
    message = _bad(_single([17, 8, 8], [0.0] * 10, name="pixels"), DIGITS)
    assert "1088 elements" in message
    assert "at most 1024" in message
    # A huge declared shape is refused just the same, without allocating anything.
    assert "takes at most" in _bad(_single([10**9, 8, 8], [0.0], name="pixels"), DIGITS)


@pytest.mark.parametrize("values", [5, 7])
def test_data_count_must_match_shape(values: int) -> None:
    message = _bad(_single([2, 3], [1.0] * values))
    assert f"data has {values} values but shape [2, 3] needs 6" in message


def test_nested_data_count_must_match_shape() -> None:
    message = _bad(_single([3, 3], [[1, 2, 3], [4, 5, 6]]))
    assert "data has 6 values but shape [3, 3] needs 9" in message


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"inputs": {"name": "x"}}, "'inputs' must be a non-empty list"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": ["x"]}, "must be an object"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "needs a 'name'"),
        (_single([1, 3], [1, 2, 3], name="nope"), "has no input 'nope'"),
        ({"inputs": [{"name": "in_fp32", "shape": [1, 3], "data": [1, 2, 3]}]}, "'datatype'"),
        (_single([1, 3], [1, 2, 3], datatype="FLOAT"), "unknown datatype 'FLOAT'"),
        ({"inputs": [{"name": "in_fp32", "shape": [1, 3], "datatype": "FP32"}]}, "needs 'data'"),
        ({**_single([1, 3], [1, 2, 3]), "id": 7}, "'id' must be a string"),
        ({**_single([1, 3], [1, 2, 3]), "parameters": [1]}, "'parameters' must be an object"),
        ({**_single([1, 3], [1, 2, 3]), "outputs": "a"}, "'outputs' must be a list"),
        ({**_single([1, 3], [1, 2, 3]), "outputs": [{}]}, "needs a 'name' string"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_malformed_documents(doc: dict[str, Any], words: str) -> None:
    assert words in _bad(doc)


def test_not_json() -> None:
    assert "not valid JSON" in _bad(b"{inputs: ")


def test_not_an_object() -> None:
    assert "must be a JSON object" in _bad(b"[1, 2]")


# -- encoding --------------------------------------------------------------------------------


def _response(*tensors: Tensor, **kw: Any) -> InferenceResponse:
    return InferenceResponse(model_name="backend-name", outputs=list(tensors), **kw)


def _request(**kw: Any) -> InferenceRequest:
    return InferenceRequest(model="m", inputs=[], **kw)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_encode_every_datatype_as_json(datatype: str) -> None:
    tensor = Tensor(f"out_{datatype}", _expected(datatype), datatype)
    payload, headers = encode_v2_response(_response(tensor), _request(), "m")
    assert headers == {"content-type": "application/json"}
    doc = orjson.loads(payload)
    (output,) = doc["outputs"]
    assert output["name"] == f"out_{datatype}"
    assert output["datatype"] == datatype
    assert output["shape"] == [2, 3]
    # Flat, row-major; BYTES as text.
    assert output["data"] == SAMPLE[datatype]


@pytest.mark.parametrize("datatype", DATATYPES)
def test_encode_every_datatype_as_binary(datatype: str) -> None:
    tensor = Tensor("out", _expected(datatype), datatype)
    request = _request(outputs=[RequestedOutput("out", {"binary_data": True})])
    payload, headers = encode_v2_response(_response(tensor), request, "m")
    assert headers["content-type"] == "application/octet-stream"
    split = int(headers["inference-header-content-length"])
    doc = orjson.loads(payload[:split])
    (output,) = doc["outputs"]
    assert "data" not in output
    size = output["parameters"]["binary_data_size"]
    assert payload[split:] == binary_bytes(_expected(datatype))
    assert size == len(payload) - split


def test_request_level_binary_data_output_applies_to_all_but_opt_outs() -> None:
    a = Tensor.from_array("a", np.arange(4, dtype=np.float32))
    b = Tensor.from_array("b", np.arange(3, dtype=np.int64))
    c = Tensor.from_array("c", np.arange(2, dtype=np.uint8))
    request = _request(
        parameters={"binary_data_output": True},
        outputs=[
            RequestedOutput("a"),
            RequestedOutput("b", {"binary_data": False}),
            RequestedOutput("c"),
        ],
    )
    payload, headers = encode_v2_response(_response(a, b, c), request, "m")
    split = int(headers["inference-header-content-length"])
    outputs = orjson.loads(payload[:split])["outputs"]
    assert outputs[0]["parameters"] == {"binary_data_size": 16}
    assert outputs[1]["data"] == [0, 1, 2]
    assert outputs[2]["parameters"] == {"binary_data_size": 2}
    # Blobs follow in output order.
    assert payload[split:] == a.data.tobytes() + c.data.tobytes()


def test_requested_outputs_come_back_in_the_order_asked() -> None:
    a = Tensor.from_array("a", np.zeros(1, np.float32))
    b = Tensor.from_array("b", np.ones(1, np.float32))
    request = _request(outputs=[RequestedOutput("b"), RequestedOutput("a")])
    doc = orjson.loads(encode_v2_response(_response(a, b), request, "m")[0])
    assert [o["name"] for o in doc["outputs"]] == ["b", "a"]
    only_b = _request(outputs=[RequestedOutput("b")])
    doc = orjson.loads(encode_v2_response(_response(a, b), only_b, "m")[0])
    assert [o["name"] for o in doc["outputs"]] == ["b"]


def test_requested_output_the_model_did_not_produce() -> None:
    a = Tensor.from_array("a", np.zeros(1, np.float32))
    with pytest.raises(BadRequest, match="did not produce output 'z'"):
        encode_v2_response(_response(a), _request(outputs=[RequestedOutput("z")]), "m")


def test_encode_echoes_id_names_the_logical_model_and_passes_parameters() -> None:
    a = Tensor.from_array("a", np.zeros((1, 2), np.float32))
    response = _response(a, model_version="1", parameters={"sequence_end": True})
    doc = orjson.loads(encode_v2_response(response, _request(id="abc"), "digits")[0])
    assert doc["model_name"] == "digits"  # the client's name, not the backend's
    assert doc["model_version"] == "1"
    assert doc["id"] == "abc"
    assert doc["parameters"] == {"sequence_end": True}
    assert doc["outputs"][0]["data"] == [0.0, 0.0]


def test_encode_without_id_or_version_leaves_them_out() -> None:
    a = Tensor.from_array("a", np.zeros(1, np.float32))
    doc = orjson.loads(encode_v2_response(_response(a), _request(), "m")[0])
    assert "id" not in doc
    assert "model_version" not in doc
    assert "parameters" not in doc


def test_binary_request_and_response_round_trip() -> None:
    images = np.random.default_rng(0).uniform(0, 16, (3, 8, 8)).astype(np.float32)
    body, length = _binary_body(
        {
            "id": "r1",
            "parameters": {"binary_data_output": True},
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [3, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
        },
        [images.tobytes()],
    )
    request = decode_v2_request(body, "digits", None, DIGITS, header_length=length)
    assert np.array_equal(request.inputs[0].data, images)
    out = Tensor.from_array("probabilities", images.reshape(3, 64)[:, :10].copy())
    payload, headers = encode_v2_response(_response(out), request, "digits")
    split = int(headers["inference-header-content-length"])
    doc = orjson.loads(payload[:split])
    assert doc["id"] == "r1"
    back = np.frombuffer(payload[split:], dtype=np.float32).reshape(doc["outputs"][0]["shape"])
    assert np.array_equal(back, out.data)
