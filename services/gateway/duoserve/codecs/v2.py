"""Open Inference Protocol (KServe V2) JSON and Triton's binary tensor extension, both ways.

What the V2 front door decodes (``decode_v2_request``) and answers (``encode_v2_response``),
and what the V2 and TorchServe backends send (``encode_v2_request``, ``binary_request``) and
read back (``decode_v2_response``). Tensor data goes from JSON straight to numpy (orjson, no
per-element model validation); every input a client sends is bounded by the model's declared
shape before any array is built. Binary tensors are raw little-endian bytes; a BYTES element is
a 4-byte little-endian length, then its bytes.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

from duoserve.codecs.arrays import array_from_json, array_to_json
from duoserve.config import ModelConfig
from duoserve.errors import BadRequest
from duoserve.tensors import (
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    Tensor,
    numpy_dtype,
)

HEADER_LENGTH = "inference-header-content-length"
"""The binary extension's header: the byte length of the JSON part (lower case, as ASGI and
the gateway's HTTP client give header names)."""
BINARY_EXTENSION = "binary_tensor_data"
"""The extension's name in a server's ``GET /v2`` ``extensions``."""
PLATFORMS = {"pytorch": "pytorch_torchscript", "tensorflow": "tensorflow_savedmodel"}
MAX_DIMS = 16


# -- tensors as JSON ----------------------------------------------------------------------


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


def strict_json_input(tensor: Tensor) -> dict[str, Any]:
    """An input as V2 JSON for a server that reads JSON only: flat ``data``, BYTES as text.
    What JSON cannot carry is refused rather than changed: NaN and infinities (JSON has no such
    numbers; they would arrive as null) and BYTES that are not UTF-8 text."""
    data: Any
    if tensor.datatype == "BYTES" or tensor.data.dtype.kind in ("O", "S"):
        try:
            data = [
                v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v)
                for v in tensor.data.ravel()
            ]
        except UnicodeDecodeError:
            raise BadRequest(
                f"input '{tensor.name}': a BYTES element is not UTF-8 text, which this model's "
                "Open Inference Protocol server cannot take (it reads JSON only)"
            ) from None
    else:
        data = np.ascontiguousarray(tensor.data.ravel())
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise BadRequest(
                f"input '{tensor.name}' holds NaN or infinity, which this model's Open Inference "
                "Protocol server cannot take (it reads JSON only)"
            )
    return {"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype, "data": data}


def loads_body(raw: bytes | memoryview) -> Any:
    """A request body's JSON; BadRequest that says where it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None


# -- the binary tensor extension ------------------------------------------------------------


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
    """An array's bytes in the binary extension: row-major little-endian values, or BYTES
    elements each prefixed by its length."""
    if array.dtype.kind in ("O", "S", "U"):
        parts = []
        for value in array.ravel():
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def binary_headers(header_length: int) -> dict[str, str]:
    """Request headers of a body in the binary tensor extension (JSON header, then bytes)."""
    return {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }


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


# -- what a client sends the front door, and its answer --------------------------------------


def _shape(value: Any, name: str) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise BadRequest(
            f"input '{name}': shape must be a list of at most {MAX_DIMS} non-negative integers"
        )
    return value


def decode_v2_request(
    body: bytes,
    model_name: str,
    version: str | None,
    config: ModelConfig,
    header_length: str | None = None,
    parsed: Any = None,
) -> InferenceRequest:
    """A V2 infer body (JSON, or JSON + binary tensors) -> InferenceRequest.

    ``parsed``: the JSON body already parsed by the caller (a JSON-only body), not parsed again.
    """
    binary = memoryview(b"")
    json_part: bytes | memoryview = body
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(
                "Inference-Header-Content-Length must be the byte length of the JSON part"
            )
        split = int(header_length)
        view = memoryview(body)
        json_part, binary = view[:split], view[split:]
    doc = loads_body(json_part) if parsed is None or header_length is not None else parsed
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object with an 'inputs' list")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    specs = config.input_specs
    offset = 0
    inputs: list[Tensor] = []
    for item in inputs_doc:
        if not isinstance(item, dict):
            raise BadRequest("each entry of 'inputs' must be an object with name, shape, datatype")
        name = item.get("name")
        if not isinstance(name, str):
            raise BadRequest("each input needs a 'name' string")
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(
                f"model '{model_name}' has no input '{name}'; its inputs are: {', '.join(specs)}"
            )
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise BadRequest(f"input '{name}' needs a 'datatype' string, e.g. {spec.datatype}")
        dtype = numpy_dtype(datatype)
        shape = _shape(item.get("shape"), name)
        count = math.prod(shape)
        limit = spec.max_elements(config.max_batch)
        if count > limit:
            raise BadRequest(
                f"input '{name}': shape {shape} has {count} elements; model '{model_name}' "
                f"takes at most {limit} ({spec.shape}, up to {config.max_batch} rows)"
            )
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest(f"input '{name}': 'parameters' must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a byte count")
            if offset + size > len(binary):
                raise BadRequest(
                    f"input '{name}': binary_data_size {size} runs past the end of the body"
                )
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                array = split_bytes_elements(bytes(chunk), count, name)
            else:
                if size != count * dtype.itemsize:
                    raise BadRequest(
                        f"input '{name}': {size} bytes of binary data, but shape {shape} of "
                        f"{datatype} needs {count * dtype.itemsize}"
                    )
                array = np.frombuffer(chunk, dtype=dtype)
            parameters = {k: v for k, v in parameters.items() if k != "binary_data_size"}
        else:
            if "data" not in item:
                raise BadRequest(f"input '{name}' needs 'data' (or binary_data_size)")
            array = array_from_json(item["data"], datatype, name)
        if array.size != count:
            raise BadRequest(
                f"input '{name}': data has {array.size} values but shape {shape} needs {count}"
            )
        inputs.append(Tensor(name, array.reshape(shape), datatype, parameters))
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary) - offset} bytes of binary data no input claims"
        )
    outputs = _requested_outputs(doc.get("outputs"))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be an object")
    return InferenceRequest(
        model=model_name,
        inputs=inputs,
        version=version,
        id=request_id,
        outputs=outputs,
        parameters=parameters,
    )


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be a list of {\"name\": ...} objects")
    outputs = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each entry of 'outputs' needs a 'name' string")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest(f"output '{item['name']}': 'parameters' must be an object")
        outputs.append(RequestedOutput(item["name"], parameters))
    return outputs


def select_outputs(
    response: InferenceResponse, request: InferenceRequest
) -> list[tuple[Tensor, dict[str, Any]]]:
    """The outputs to return, in the order asked for, each with its requested parameters."""
    if not request.outputs:
        return [(tensor, {}) for tensor in response.outputs]
    chosen = []
    for wanted in request.outputs:
        tensor = response.output(wanted.name)
        if tensor is None:
            raise BadRequest(f"the model did not produce output '{wanted.name}'")
        chosen.append((tensor, wanted.parameters))
    return chosen


def encode_v2_response(
    response: InferenceResponse, request: InferenceRequest, model_name: str
) -> tuple[bytes, dict[str, str]]:
    """InferenceResponse -> V2 JSON (+ binary outputs when asked for), and extra headers."""
    binary_all = bool(request.parameters.get("binary_data_output"))
    outputs = []
    blobs: list[bytes] = []
    for tensor, params in select_outputs(response, request):
        if params.get("binary_data", binary_all):
            blob = binary_bytes(tensor.data)
            blobs.append(blob)
            outputs.append(
                {
                    "name": tensor.name,
                    "datatype": tensor.datatype,
                    "shape": tensor.shape,
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
        else:
            outputs.append(json_tensor(tensor))
    doc: dict[str, Any] = {"model_name": model_name, "outputs": outputs}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if request.id is not None:
        doc["id"] = request.id
    if response.parameters:
        doc["parameters"] = response.parameters
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def compare_report_outputs(
    response: InferenceResponse, request: InferenceRequest
) -> list[dict[str, Any]]:
    """One route's outputs in a compare report: V2 JSON entries whose data are plain lists
    (the report is serialised without numpy support)."""
    return [
        {
            "name": t.name,
            "datatype": t.datatype,
            "shape": t.shape,
            "data": array_to_json(t.data),
        }
        for t, _ in select_outputs(response, request)
    ]


def model_metadata(name: str, config: ModelConfig, frameworks: list[str]) -> dict[str, Any]:
    """A model's V2 metadata: name, versions, platform, inputs, outputs."""
    versions = sorted({config.version, *(r.version for r in config.routes if r.version)})
    platform = config.platform or (
        PLATFORMS[frameworks[0]] if len(frameworks) == 1 else "duoserve_" + "_".join(frameworks)
    )
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [s.model_dump(include={"name", "datatype", "shape"}) for s in config.inputs],
        "outputs": [s.model_dump(include={"name", "datatype", "shape"}) for s in config.outputs],
    }


# -- what a backend sends a V2 server, and reads back ----------------------------------------


def encode_v2_request(request: InferenceRequest, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The body and content headers of an infer call: JSON header + binary tensors (all
    outputs asked for in binary too), or plain V2 JSON."""
    fields: dict[str, Any] = {}
    if request.id is not None:
        fields["id"] = request.id
    if binary:
        fields["parameters"] = {"binary_data_output": True}
        if request.outputs:
            fields["outputs"] = [
                {"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs
            ]
        body, header_length = binary_request(request.inputs, **fields)
        return body, binary_headers(header_length)
    if request.outputs:
        fields["outputs"] = [{"name": o.name} for o in request.outputs]
    fields["inputs"] = [strict_json_input(t) for t in request.inputs]
    body = orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)
    return body, {"Content-Type": "application/json"}


def _json_array(data: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """A server's JSON ``data`` as an array of ``dtype``. Numbers for a float output go through
    float64 first: numpy builds that from a list several times faster than float32, and the
    cast after it is cheap. Anything else (integers, null, text) is converted as asked."""
    if dtype.kind == "f":
        raw = np.asarray(data)
        if raw.dtype.kind in "fi":
            return raw.astype(dtype, copy=False)
    return np.asarray(data, dtype=dtype)


def decode_v2_response(
    raw: bytes, header_length: str | None, request: InferenceRequest
) -> InferenceResponse:
    """A server's V2 answer to ``request`` (JSON, or JSON + binary outputs after
    ``header_length`` bytes): its outputs and the ``model_version`` it names.

    Trusts the server as far as numpy lets it: an answer not in the V2 shape raises KeyError,
    TypeError, ValueError, AttributeError or DuoServeError, which the caller reports as the
    server's failure."""
    split = int(header_length) if header_length else len(raw)
    doc = orjson.loads(raw[:split])
    rest = memoryview(raw)[split:]
    outputs = []
    offset = 0
    for item in doc["outputs"]:
        dtype = numpy_dtype(item["datatype"])
        shape = item["shape"]
        parameters = item.get("parameters")
        size = parameters.get("binary_data_size") if parameters else None
        if size is not None:
            chunk = rest[offset : offset + size]
            offset += size
            if item["datatype"] == "BYTES":
                count = int(np.prod(shape)) if shape else 1
                array = split_bytes_elements(bytes(chunk), count, item["name"])
            else:
                array = np.frombuffer(chunk, dtype=dtype)
        else:
            array = _json_array(item["data"], dtype)
        outputs.append(Tensor(item["name"], array.reshape(shape), item["datatype"]))
    return InferenceResponse(
        model_name=request.model,
        model_version=doc.get("model_version"),
        outputs=outputs,
        id=request.id,
    )
