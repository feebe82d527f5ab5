"""JSON data -> numpy for every V2 datatype, the refusals, and the binary BYTES layout."""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np
import pytest

from duoserve.codecs.arrays import array_from_json, array_to_json
from duoserve.codecs.v2 import binary_bytes, split_bytes_elements
from duoserve.errors import BadRequest
from duoserve.tensors import V2_TO_NUMPY, InferenceRequest, Tensor, datatype_of, numpy_dtype

NUMERIC_CASES: list[tuple[str, Any, np.dtype[Any]]] = [
    ("BOOL", [[True, False], [False, True]], np.dtype(bool)),
    ("INT8", [[-128, 0], [1, 127]], np.dtype("<i1")),
    ("INT16", [[-32768, 0], [1, 32767]], np.dtype("<i2")),
    ("INT32", [[-(2**31), 0], [1, 2**31 - 1]], np.dtype("<i4")),
    ("INT64", [[-(2**63), 0], [1, 2**63 - 1]], np.dtype("<i8")),
    ("UINT8", [[0, 1], [128, 255]], np.dtype("<u1")),
    ("UINT16", [[0, 1], [128, 65535]], np.dtype("<u2")),
    ("UINT32", [[0, 1], [128, 2**32 - 1]], np.dtype("<u4")),
    ("UINT64", [[0, 1], [128, 2**64 - 1]], np.dtype("<u8")),
    ("FP16", [[0.5, -1.25], [2, 65504.0]], np.dtype("<f2")),
    ("FP32", [[0.5, -1.25], [3, 1e38]], np.dtype("<f4")),
    ("FP64", [[0.5, -1.25], [3, 1e300]], np.dtype("<f8")),
]


@pytest.mark.parametrize(("datatype", "data", "dtype"), NUMERIC_CASES, ids=lambda v: str(v)[:8])
def test_numeric_datatypes(datatype: str, data: Any, dtype: np.dtype[Any]) -> None:
    array = array_from_json(data, datatype, "x")
    assert array.dtype == dtype
    assert array.shape == (2, 2)
    # Exact values survive (the extremes of each integer type included).
    assert array.tolist() == np.array(data, dtype=dtype).tolist()
    assert datatype_of(array) == datatype


def test_flat_data_stays_flat() -> None:
    array = array_from_json([1, 2, 3, 4, 5, 6], "INT32", "x")
    assert array.shape == (6,)
    assert array.reshape(2, 3).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_scalar() -> None:
    assert array_from_json(3.5, "FP64", "x").tolist() == 3.5


def test_integers_are_fine_in_float_tensors() -> None:
    array = array_from_json([1, 2, 16], "FP32", "x")
    assert array.dtype == np.float32
    assert array.tolist() == [1.0, 2.0, 16.0]


def test_empty_data() -> None:
    array = array_from_json([], "FP32", "x")
    assert array.dtype == np.float32
    assert array.size == 0


def test_bytes_strings_and_b64() -> None:
    payload = bytes(range(256))
    data = [["hello", {"b64": base64.b64encode(payload).decode()}], ["é", ""]]
    array = array_from_json(data, "BYTES", "x")
    assert array.dtype == object
    assert array.shape == (2, 2)
    assert array[0, 0] == b"hello"
    assert array[0, 1] == payload
    assert array[1, 0] == "é".encode()
    assert array[1, 1] == b""
    assert datatype_of(array) == "BYTES"


@pytest.mark.parametrize(
    ("data", "datatype", "words"),
    [
        (["1.0", "2.0"], "FP32", "not strings"),
        ([1.0, "a"], "FP32", "not strings"),
        ([300], "UINT8", "[0, 255]"),
        ([-1], "UINT8", "[0, 255]"),
        ([2**63], "INT64", "INT64"),
        ([1.5], "INT32", "whole numbers"),
        ([1, 2.5], "INT8", "whole numbers"),
        ([True], "FP32", "not true/false"),
        ([True], "INT32", "not true/false"),
        ([1, 0], "BOOL", "true or false"),
        ([[1, 2], [3]], "FP32", "ragged"),
        ([[1, 2], [3, [4]]], "FP32", "ragged"),
        ([1e300], "FP32", "too large for FP32"),
        ([1e300], "FP16", "too large for FP16"),
        ([1e5], "FP16", "too large for FP16"),
        ([1, None], "FP32", "FP32"),
        ([{"a": 1}], "FP32", "FP32"),
        ([[["a"], ["b", "c"]]], "BYTES", "equal lengths"),
        ([1], "BYTES", "BYTES data must be strings"),
        ([{"b64": "not base64!"}], "BYTES", "invalid base64"),
        ([1], "FLOAT", "unknown datatype 'FLOAT'"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_rejections_name_the_input(data: Any, datatype: str, words: str) -> None:
    with pytest.raises(BadRequest) as caught:
        array_from_json(data, datatype, "pixels")
    assert caught.value.status == 400
    assert words in caught.value.message
    if "unknown datatype" not in words:
        assert "'pixels'" in caught.value.message


def test_whole_number_too_large_for_fp16_is_refused() -> None:
    # 70000 is above FP16's largest value (65504): it must not turn into inf silently.
    with pytest.raises(BadRequest, match="too large for FP16"):
        array_from_json([70000], "FP16", "pixels")


@pytest.mark.parametrize(
    ("values", "datatype"),
    [
        ([3.0e38, -1.0], "FP32"),  # near the largest FP32 value: the unchecked cast
        ([-3.0e38, 3.0e38], "FP32"),  # both fit; the sum of their squares does not
        ([float(np.finfo(np.float32).max)], "FP32"),  # the largest itself
        ([1e38] * 64, "FP32"),  # each fits, though their squares add up past the largest's
        ([65504.0, -65504.0], "FP16"),
        ([255.0] * 64, "FP16"),
        ([0, 255, 2**62, -(2**63)], "FP32"),  # integers: any 64-bit one fits FP32
        ([[1, 2], [3, 4]], "FP64"),
    ],
    ids=["fp32-near-max", "fp32-two-near-max", "fp32-max", "fp32-many-large", "fp16-max",
         "fp16-pixels", "fp32-integers", "fp64-integers"],  # fmt: skip
)
def test_floats_up_to_the_largest_value_of_their_type_are_taken(
    values: list[float], datatype: str
) -> None:
    array = array_from_json(values, datatype, "pixels")
    assert array.dtype == numpy_dtype(datatype)
    assert np.isfinite(array).all()
    np.testing.assert_allclose(array.astype(np.float64), np.array(values, float), rtol=1e-3)


def test_a_float_just_past_the_largest_fp32_value_is_refused() -> None:
    # 3.5e38 is the only value past FP32's largest (about 3.4028e38) among values that fit.
    with pytest.raises(BadRequest, match="too large for FP32"):
        array_from_json([1.0] * 63 + [3.5e38], "FP32", "pixels")


def test_too_deep_bytes_nesting() -> None:
    data: Any = "leaf"
    for _ in range(40):
        data = [data]
    with pytest.raises(BadRequest, match="nested too deeply"):
        array_from_json(data, "BYTES", "text")


def test_nan_and_infinity_pass_through_float_types() -> None:
    # Not an overflow: the client sent them on purpose (orjson never produces them, numpy may).
    array = array_from_json([float("inf"), 1.0], "FP32", "x")
    assert np.isinf(array[0])


def test_array_to_json_flattens_row_major() -> None:
    assert array_to_json(np.arange(6, dtype=np.int16).reshape(2, 3)) == [0, 1, 2, 3, 4, 5]
    words = np.array([b"a", b"b", b"\xff"], dtype=object)
    assert array_to_json(words) == ["a", "b", "\ufffd"]


def test_bytes_binary_round_trip() -> None:
    values = [b"", b"abc", bytes(range(256)), "ü".encode()]
    array = np.empty(4, dtype=object)
    array[:] = values
    raw = binary_bytes(array.reshape(2, 2))
    # 4-byte little-endian length, then the bytes, element by element.
    assert raw[:4] == struct.pack("<I", 0)
    assert raw[4:8] == struct.pack("<I", 3)
    assert raw[8:11] == b"abc"
    back = split_bytes_elements(raw, 4, "x")
    assert back.tolist() == values


@pytest.mark.parametrize("datatype", [d for d in V2_TO_NUMPY if d != "BYTES"])
def test_numeric_binary_round_trip(datatype: str) -> None:
    dtype = numpy_dtype(datatype)
    array = (np.arange(6) % 2).astype(dtype).reshape(3, 2)
    raw = binary_bytes(array)
    assert len(raw) == 6 * dtype.itemsize
    assert np.array_equal(np.frombuffer(raw, dtype=dtype).reshape(3, 2), array)


def test_binary_bytes_is_little_endian_whatever_the_input_order() -> None:
    big = np.array([1, 256], dtype=">u2")
    assert binary_bytes(big) == b"\x01\x00\x00\x01"


@pytest.mark.parametrize(
    ("raw", "count", "words"),
    [
        (struct.pack("<I", 3) + b"ab", 1, "overruns"),
        (struct.pack("<I", 1) + b"a", 2, "ends early"),
        (struct.pack("<I", 1) + b"abc", 1, "2 extra bytes"),
    ],
)
def test_split_bytes_elements_refuses_bad_layouts(raw: bytes, count: int, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        split_bytes_elements(raw, count, "text")


def test_batch_size() -> None:
    rows = InferenceRequest("m", [Tensor.from_array("x", np.zeros((7, 3), np.float32))])
    assert rows.batch_size() == 7
    scalar = InferenceRequest("m", [Tensor.from_array("x", np.float32(1.0).reshape(()))])
    assert scalar.batch_size() == 1
