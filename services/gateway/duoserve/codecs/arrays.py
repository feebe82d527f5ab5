"""JSON values <-> numpy arrays of a V2 datatype: the element conversion every JSON codec
(V2, TF Serving, TorchServe) shares."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from duoserve.errors import BadRequest
from duoserve.tensors import INTEGER_TYPES, V2_TO_NUMPY, numpy_dtype


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
    if raw.dtype == dtype:
        return raw
    # The cast cannot overflow, so it needs no errstate (5 us, more than the cast itself) and
    # no check after, when the data are integers and the type is FP32 or FP64 (both hold the
    # magnitude of any 64-bit integer), or floats (float64 from JSON) whose sum of squares is
    # below the square of the type's largest value: then every one is within its range. (vdot,
    # unlike dot, raises no overflow warning when the sum itself overflows to inf.)
    if (kind in "iu" and dtype.itemsize >= 4) or (
        kind == "f" and np.vdot(raw, raw) < _SQUARED_MAX.get(dtype, 0.0)
    ):
        return raw.astype(dtype)
    with np.errstate(over="ignore"):
        array = raw.astype(dtype)
    if not np.isfinite(array).all() and np.isfinite(raw).all():
        raise BadRequest(f"input '{name}': a value is too large for {datatype}")
    return array


# The square of each narrower float type's largest value, as float64.
_SQUARED_MAX = {
    np.dtype(t): float(np.finfo(t).max) ** 2 for t in (np.float16, np.float32)
}

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
