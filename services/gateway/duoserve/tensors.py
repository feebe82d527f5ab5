"""Canonical inference types shared by every frontend and backend.

A tensor is a numpy array plus its Open Inference Protocol (V2) name and datatype. Frontends
decode into these types; backends encode from them. BYTES tensors are numpy object arrays of
``bytes``.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from duoserve.errors import BadRequest

# V2 datatype -> numpy dtype (little-endian, the wire order of the binary extension and of
# TF Serving's tensor_content).
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}

INTEGER_TYPES = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
)
_KIND_PREFIX = {"u": "UINT", "i": "INT", "f": "FP"}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of a numpy array."""
    kind = array.dtype.kind
    if kind in ("O", "S", "U"):
        return "BYTES"
    if kind == "b":
        return "BOOL"
    name = f"{_KIND_PREFIX.get(kind, '?')}{array.dtype.itemsize * 8}"
    if name not in V2_TO_NUMPY:
        raise TypeError(f"no V2 datatype for numpy dtype {array.dtype}")
    return name


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name; BadRequest for an unknown name."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(V2_TO_NUMPY)
        raise BadRequest(f"unknown datatype '{datatype}'; use one of {known}") from None


@dataclass(slots=True)
class Tensor:
    """A named tensor: numpy data plus its V2 datatype."""

    name: str
    data: np.ndarray
    datatype: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)

    @classmethod
    def from_array(cls, name: str, array: np.ndarray, **parameters: Any) -> Tensor:
        return cls(name=name, data=array, datatype=datatype_of(array), parameters=parameters)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, with its parameters (e.g. ``binary_data``)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    """One inference call, independent of the client protocol and of the backend."""

    model: str
    inputs: list[Tensor]
    version: str | None = None
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    framework: str | None = None
    """The framework of the route it is addressed to (set by the router)."""

    def batch_size(self) -> int:
        """Rows in the request: the first dimension of the first input (1 for scalars)."""
        if not self.inputs or self.inputs[0].data.ndim == 0:
            return 1
        return int(self.inputs[0].data.shape[0])

    def with_target(self, model: str, version: str | None, framework: str) -> InferenceRequest:
        """The same request addressed to a route: the backend's model name, version, framework."""
        return InferenceRequest(
            model=model,
            inputs=self.inputs,
            version=version,
            id=self.id,
            outputs=self.outputs,
            parameters=self.parameters,
            framework=framework,
        )


@dataclass(slots=True)
class InferenceResponse:
    """The answer to an InferenceRequest."""

    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> Tensor | None:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        return None


def _whole_numbers(data: Any, datatype: str, name: str) -> np.ndarray:
    values = np.array(data, dtype=object)
    flat = values.ravel()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise BadRequest(f"input '{name}': {datatype} data must be whole numbers")
    _check_range(values, datatype, name)  # object array of Python ints: no overflow here
    return values.astype(V2_TO_NUMPY[datatype])


def _check_range(array: np.ndarray, datatype: str, name: str) -> None:
    info = np.iinfo(V2_TO_NUMPY[datatype])
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise BadRequest(
            f"input '{name}': values must lie in [{info.min}, {info.max}] for {datatype}"
        )


def array_from_json(data: Any, datatype: str, name: str) -> np.ndarray:
    """Build a numpy array of ``datatype`` from JSON ``data`` (a scalar or flat/nested lists).

    Refuses, with a message naming the input, what does not fit the datatype: strings in a
    numeric tensor, floats in an integer tensor, out-of-range integers, values that overflow a
    float type, ragged nesting. The caller reshapes and checks the shape.
    """
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        return _bytes_array(data, name)
    try:
        raw = np.array(data)
    except (ValueError, OverflowError):
        raise BadRequest(f"input '{name}': data is ragged or not numeric") from None
    kind = raw.dtype.kind
    if raw.size == 0:
        return raw.astype(dtype)
    if kind == "O":
        raise BadRequest(
            f"input '{name}': data must be nested lists of equal length holding "
            f"{datatype} values (ragged lists or integers too large for 64 bits)"
        )
    if kind in ("U", "S"):
        raise BadRequest(f"input '{name}': {datatype} data must be numbers, not strings")
    if datatype == "BOOL":
        if kind != "b":
            raise BadRequest(f"input '{name}': BOOL data must be true or false")
        return raw
    if kind == "b":
        raise BadRequest(f"input '{name}': {datatype} data must be numbers, not true/false")
    if datatype in INTEGER_TYPES:
        if kind == "f":
            # numpy turns ints beyond int64 (large UINT64 values) into floats: look again.
            return _whole_numbers(data, datatype, name)
        _check_range(raw, datatype, name)
        return raw.astype(dtype)
    # Floating point: integers are fine; values beyond the type's range are not.
    with np.errstate(over="ignore"):
        array = raw.astype(dtype)
    if not np.isfinite(array).all() and np.isfinite(raw).all():
        raise BadRequest(f"input '{name}': a value is too large for {datatype}")
    return array


MAX_NESTING = 32


def _bytes_array(data: Any, name: str) -> np.ndarray:
    flat: list[bytes] = []

    def walk(value: Any, depth: int) -> tuple[int, ...]:
        if isinstance(value, list):
            if depth >= MAX_NESTING:
                raise BadRequest(f"input '{name}': data is nested too deeply")
            shapes = {walk(v, depth + 1) for v in value}
            if len(shapes) > 1:
                raise BadRequest(f"input '{name}': nested lists must have equal lengths")
            return (len(value), *(shapes.pop() if shapes else ()))
        flat.append(_to_bytes(value, name))
        return ()

    shape = walk(data, 0)
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape)


def _to_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise BadRequest(f"input '{name}': invalid base64 in a b64 value") from None
    raise BadRequest(f"input '{name}': BYTES data must be strings (or {{\"b64\": ...}})")


def array_to_json(array: np.ndarray) -> Any:
    """A flat JSON-ready list (BYTES as UTF-8 text) of an array's row-major elements."""
    if array.dtype.kind in ("O", "S"):
        return [
            v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)
            for v in array.ravel()
        ]
    return array.ravel().tolist()


def json_data(tensor: Tensor) -> Any:
    """A tensor's V2 JSON ``data`` for orjson with OPT_SERIALIZE_NUMPY: numbers as a flat
    contiguous array (serialised by orjson without a Python list), BYTES as UTF-8 text."""
    if tensor.datatype == "BYTES" or tensor.data.dtype.kind in ("O", "S"):
        return array_to_json(tensor.data)
    return np.ascontiguousarray(tensor.data.ravel())


def json_tensor(tensor: Tensor) -> dict[str, Any]:
    """A tensor as a V2 JSON entry: name, datatype, shape and flat data."""
    return {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": tensor.shape,
        "data": json_data(tensor),
    }


def split_bytes_elements(raw: bytes, count: int, name: str) -> np.ndarray:
    """BYTES in the binary extension: each element a 4-byte little-endian length, then bytes."""
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise BadRequest(f"input '{name}': binary BYTES data ends early")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(f"input '{name}': binary BYTES element overruns its data")
        out[i] = bytes(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise BadRequest(f"input '{name}': binary BYTES data has {len(raw) - offset} extra bytes")
    return out


def binary_bytes(array: np.ndarray) -> bytes:
    if array.dtype.kind in ("O", "S", "U"):
        parts = []
        for value in array.ravel():
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def binary_request(inputs: list[Tensor], **fields: Any) -> tuple[bytes, int]:
    """A V2 request with the binary tensor extension: the JSON header (``inputs`` with their
    ``binary_data_size``, plus ``fields``), then each input's raw little-endian bytes.
    Returns the body and the header's length (for ``Inference-Header-Content-Length``)."""
    blobs = [binary_bytes(t.data) for t in inputs]
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": t.name,
                    "shape": t.shape,
                    "datatype": t.datatype,
                    "parameters": {"binary_data_size": len(blob)},
                }
                for t, blob in zip(inputs, blobs, strict=True)
            ],
            **fields,
        }
    )
    return b"".join([header, *blobs]), len(header)
