"""TF Serving's REST JSON, both ways: what the TF Serving front door decodes (``instances`` row
format or ``inputs`` columnar) and answers (``predictions`` or ``outputs``), what the TF Serving
REST backend posts and reads back, and the metadata JSON of each side. Also the V2 <-> TensorFlow
dtype names, which the gRPC codec (:mod:`duoserve.codecs.tensorproto`) shares.

As TF Serving does: a bare value when a model has one output, an object keyed by output name
when it has several (a list of such objects, one per row, in row format); binary values travel
as ``{"b64": ...}``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import orjson

from duoserve.codecs.arrays import array_from_json
from duoserve.config import ModelConfig, TensorSpec
from duoserve.errors import BadRequest
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor, numpy_dtype

# V2 datatype -> TensorFlow DataType enum name.
TF_DTYPES: dict[str, str] = {
    "BOOL": "DT_BOOL",
    "UINT8": "DT_UINT8",
    "UINT16": "DT_UINT16",
    "UINT32": "DT_UINT32",
    "UINT64": "DT_UINT64",
    "INT8": "DT_INT8",
    "INT16": "DT_INT16",
    "INT32": "DT_INT32",
    "INT64": "DT_INT64",
    "FP16": "DT_HALF",
    "FP32": "DT_FLOAT",
    "FP64": "DT_DOUBLE",
    "BYTES": "DT_STRING",
}
DT_NAME_TO_V2: dict[str, str] = {name: v2 for v2, name in TF_DTYPES.items()}

DEFAULT_SIGNATURE = "serving_default"


def signature_name(request: InferenceRequest) -> str:
    """The signature a request runs: its ``signature_name`` parameter, else serving_default."""
    return str(request.parameters.get("signature_name") or DEFAULT_SIGNATURE)


def is_b64(value: Any) -> bool:
    """Whether a JSON value is one binary string, ``{"b64": "..."}``."""
    return isinstance(value, dict) and set(value) == {"b64"}


# -- what a client sends the front door, and its answer --------------------------------------


def _array(value: Any, spec: TensorSpec, max_batch: int) -> np.ndarray:
    array = array_from_json(value, spec.datatype, spec.name)
    if array.size > spec.max_elements(max_batch):
        raise BadRequest(
            f"input '{spec.name}' has {array.size} values; the model takes at most "
            f"{spec.max_elements(max_batch)} ({spec.shape}, up to {max_batch} rows)"
        )
    return array


def decode_predict(
    body: bytes, model_name: str, version: str | None, config: ModelConfig
) -> tuple[InferenceRequest, str]:
    """A :predict body -> (InferenceRequest, "row" | "columnar")."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"JSON Parse error: {error}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object with 'instances' or 'inputs'")
    specs = config.input_specs
    names = list(specs)
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise BadRequest("expecting only one of 'inputs' or 'instances' keys, not both")
    arrays: dict[str, np.ndarray] = {}
    if has_instances:
        form = "row"
        instances = doc["instances"]
        if not isinstance(instances, list) or not instances:
            raise BadRequest("'instances' must be a non-empty list, one entry per example")
        if len(instances) > config.max_batch:
            raise BadRequest(
                f"'instances' has {len(instances)} examples; at most {config.max_batch} allowed"
            )
        named = isinstance(instances[0], dict) and not is_b64(instances[0])
        if not named:
            if len(names) > 1:
                raise BadRequest(
                    f"'instances' is a plain list, but the model takes several inputs "
                    f"({', '.join(names)}): send a list of objects"
                )
            arrays[names[0]] = _array(instances, specs[names[0]], config.max_batch)
        else:
            columns: dict[str, list[Any]] = {name: [] for name in names}
            for index, item in enumerate(instances):
                if not isinstance(item, dict) or set(item) != set(names):
                    raise BadRequest(
                        f"element {index} of 'instances' must be an object with exactly the "
                        f"keys: {', '.join(names)}"
                    )
                for name in names:
                    columns[name].append(item[name])
            for name in names:
                arrays[name] = _array(columns[name], specs[name], config.max_batch)
    elif has_inputs:
        form = "columnar"
        value = doc["inputs"]
        if isinstance(value, dict) and not is_b64(value):
            for name in names:
                if name not in value:
                    raise BadRequest(f"missing named input '{name}' in the 'inputs' object")
            unknown = set(value) - set(names)
            if unknown:
                raise BadRequest(
                    f"model '{model_name}' has no input(s) {', '.join(sorted(unknown))}; "
                    f"its inputs are: {', '.join(names)}"
                )
            for name in names:
                arrays[name] = _array(value[name], specs[name], config.max_batch)
        else:
            if len(names) > 1:
                raise BadRequest(
                    f"'inputs' is a plain value, but the model takes several inputs "
                    f"({', '.join(names)}): send an object keyed by input name"
                )
            arrays[names[0]] = _array(value, specs[names[0]], config.max_batch)
    else:
        raise BadRequest("missing 'inputs' or 'instances' key")
    signature = doc.get("signature_name")
    if signature is not None and not isinstance(signature, str):
        raise BadRequest("'signature_name' must be a string")
    parameters: dict[str, Any] = {}
    if signature:
        parameters["signature_name"] = signature
    inputs = [Tensor(name, arrays[name], specs[name].datatype) for name in names]
    return (
        InferenceRequest(model=model_name, inputs=inputs, version=version, parameters=parameters),
        form,
    )


def _answer_value(tensor: Tensor) -> Any:
    """An output as TF Serving answers it: numbers as they are; strings as text, or as
    {"b64": ...} for outputs named ``*_bytes`` (TF Serving's json_tensor.cc rule)."""
    if tensor.datatype == "BYTES":
        as_b64 = tensor.name.endswith("_bytes")

        def encode(item: Any) -> Any:
            if isinstance(item, list):
                return [encode(i) for i in item]
            if as_b64:
                return {"b64": base64.b64encode(item).decode()}
            return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)

        return encode(tensor.data.tolist())
    return tensor.data


def encode_predict(response: InferenceResponse, form: str) -> bytes:
    """InferenceResponse -> TF Serving's predict answer."""
    outputs = sorted(response.outputs, key=lambda t: t.name)
    option = orjson.OPT_SERIALIZE_NUMPY
    if form == "columnar":
        if len(outputs) == 1:
            return orjson.dumps({"outputs": _answer_value(outputs[0])}, option=option)
        return orjson.dumps({"outputs": {t.name: _answer_value(t) for t in outputs}}, option=option)
    if len(outputs) == 1:
        return orjson.dumps({"predictions": _answer_value(outputs[0])}, option=option)
    rows = {t.name: _answer_value(t) for t in outputs}
    batch = min(int(t.data.shape[0]) for t in outputs if t.data.ndim) if outputs else 0
    return orjson.dumps(
        {"predictions": [{name: rows[name][i] for name in rows} for i in range(batch)]},
        option=option,
    )


def _tensor_info(spec: TensorSpec) -> dict[str, Any]:
    return {
        "dtype": TF_DTYPES[spec.datatype],
        "tensor_shape": {
            "dim": [{"size": str(d), "name": ""} for d in spec.shape],
            "unknown_rank": False,
        },
        "name": spec.name,
    }


def encode_metadata(model: str, version: str | None, config: ModelConfig) -> dict[str, Any]:
    """A model's ``GET .../metadata`` answer: its one signature, serving_default."""
    signature = {
        "inputs": {s.name: _tensor_info(s) for s in config.inputs},
        "outputs": {s.name: _tensor_info(s) for s in config.outputs},
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    return {
        "model_spec": {
            "name": model,
            "signature_name": "",
            "version": version or config.version,
        },
        "metadata": {"signature_def": {"signature_def": {DEFAULT_SIGNATURE: signature}}},
    }


# -- what the REST backend posts TF Serving, and reads back ----------------------------------


def _input_value(tensor: Tensor) -> Any:
    """A tensor as TF Serving's JSON: nested lists, binary strings as {"b64": ...}."""
    if tensor.datatype == "BYTES":
        flat = [
            {
                "b64": base64.b64encode(
                    item if isinstance(item, bytes) else str(item).encode()
                ).decode("ascii")
            }
            for item in tensor.data.reshape(-1)
        ]
        nested: Any = np.array(flat, dtype=object).reshape(tensor.data.shape).tolist()
        return nested
    if tensor.datatype == "FP16":
        return tensor.data.astype(np.float32)  # TF Serving parses numbers into the input dtype
    return np.ascontiguousarray(tensor.data)


def predict_body(signature: str, inputs: list[Tensor]) -> bytes:
    """A columnar ``:predict`` body: ``{"signature_name", "inputs": {name: value}}``."""
    doc: dict[str, Any] = {
        "signature_name": signature,
        "inputs": {t.name: _input_value(t) for t in inputs},
    }
    if any(t.data.dtype.kind == "f" and not np.isfinite(t.data).all() for t in inputs):
        # orjson would write NaN/Infinity as null; TF Serving reads the bare tokens instead.
        plain = {
            "signature_name": signature,
            "inputs": {
                name: value.tolist() if isinstance(value, np.ndarray) else value
                for name, value in doc["inputs"].items()
            },
        }
        return json.dumps(plain).encode()
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def loads_answer(raw: bytes) -> Any:
    """TF Serving's JSON answer; ValueError when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # TF Serving writes NaN and Infinity as bare tokens, which only a lenient parser takes.
        return json.loads(raw)


def tensor_from_json(name: str, value: Any, datatype: str | None) -> Tensor:
    """A JSON answer value as a Tensor of the signature's datatype (guessed without one)."""
    if datatype == "BYTES" or (datatype is None and _first_leaf(value, str | dict)):

        def leaf(item: Any) -> Any:
            if isinstance(item, list):
                return [leaf(i) for i in item]
            if isinstance(item, dict) and "b64" in item:
                return base64.b64decode(item["b64"])
            return str(item).encode("utf-8")

        decoded = leaf(value)
        data = np.empty(np.shape(decoded) if isinstance(decoded, list) else (), dtype=object)
        if isinstance(decoded, list):
            flat = np.array(decoded, dtype=object).reshape(-1)
            data.reshape(-1)[:] = flat
        else:
            data[()] = decoded
        return Tensor(name, data, "BYTES")
    if datatype is None:
        datatype = (
            "BOOL" if _first_leaf(value, bool) else "FP32" if _first_leaf(value, float) else "INT64"
        )
    return Tensor(name, np.asarray(value, dtype=numpy_dtype(datatype)), datatype)


def _first_leaf(value: Any, kind: Any) -> bool:
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, kind)


def _info_json(info: dict[str, Any]) -> dict[str, Any]:
    shape = info.get("tensor_shape", {})
    return {
        "dtype": info.get("dtype", "DT_INVALID"),
        "shape": None
        if shape.get("unknown_rank")
        else [int(d.get("size", 0)) for d in shape.get("dim", [])],
    }


def decode_metadata(doc: Any) -> dict[str, Any]:
    """TF Serving's REST metadata answer as ``{"model_spec": {...}, "signature_def": {name:
    {inputs, outputs, method_name}}}``; KeyError, TypeError or AttributeError when it is not
    in that shape."""
    spec = doc["model_spec"]
    signatures = doc["metadata"]["signature_def"]["signature_def"]
    return {
        "model_spec": {"name": spec["name"], "version": str(spec.get("version", ""))},
        "signature_def": {
            key: {
                "method_name": sig.get("method_name", ""),
                "inputs": {n: _info_json(i) for n, i in sig.get("inputs", {}).items()},
                "outputs": {n: _info_json(i) for n, i in sig.get("outputs", {}).items()},
            }
            for key, sig in signatures.items()
        },
    }


def output_types(metadata: dict[str, Any], signature: str) -> dict[str, str | None] | None:
    """A signature's output names and V2 datatypes (None for a type V2 lacks) from decoded
    metadata; None when the model has no such signature."""
    sig = metadata["signature_def"].get(signature)
    if sig is None:
        return None
    return {name: DT_NAME_TO_V2.get(info.get("dtype", "")) for name, info in sig["outputs"].items()}
