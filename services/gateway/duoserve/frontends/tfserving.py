"""TF Serving's REST API as a front door: an existing TF Serving client works unchanged, against
either framework.

``POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict`` takes ``instances`` (row format) or
``inputs`` (columnar) and answers ``predictions`` or ``outputs`` as TF Serving does: a bare value
when the model has one output, an object keyed by output name when it has several (a list of
such objects, one per row, in row format). Binary values travel as ``{"b64": ...}``.
``GET /v1/models/{m}[...]`` answers model status; ``.../metadata`` the signature.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from duoserve.codecs.arrays import array_from_json
from duoserve.config import ModelConfig, TensorSpec
from duoserve.dataplane import CallContext, Served
from duoserve.errors import BadRequest, NotFound
from duoserve.frontends.http import (
    LENIENT_JSON,
    Gateway,
    error_json,
    gateway_of,
    json_response,
    serve_inference,
)
from duoserve.router import ModelRouter
from duoserve.routes import FrontDoor, Kind
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor

PROTOCOL = "tfserving"

# V2 datatype -> TF DataType enum name, for metadata answers.
TF_DTYPES = {
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


# -- codec ------------------------------------------------------------------------------


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


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
        named = isinstance(instances[0], dict) and not _is_b64(instances[0])
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
        if isinstance(value, dict) and not _is_b64(value):
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


def _json_value(tensor: Tensor) -> Any:
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
            return orjson.dumps({"outputs": _json_value(outputs[0])}, option=option)
        return orjson.dumps({"outputs": {t.name: _json_value(t) for t in outputs}}, option=option)
    if len(outputs) == 1:
        return orjson.dumps({"predictions": _json_value(outputs[0])}, option=option)
    rows = {t.name: _json_value(t) for t in outputs}
    batch = min(int(t.data.shape[0]) for t in outputs if t.data.ndim) if outputs else 0
    return orjson.dumps(
        {"predictions": [{name: rows[name][i] for name in rows} for i in range(batch)]},
        option=option,
    )


def resolve_version(model: ModelRouter, version: str | None, label: str | None) -> str | None:
    """A label as models.yaml maps it; an unmapped label goes on as a label (TF Serving
    backends know their own)."""
    if label is not None:
        return model.config.version_labels.get(label, label)
    return version


def declared_version(model: ModelRouter, label: str) -> str:
    """The version a label names in models.yaml; 404 when models.yaml has no such label."""
    version = model.config.version_labels.get(label)
    if version is None:
        raise NotFound(f"model '{model.name}' has no version label '{label[:64]}'")
    return version


# -- routes -----------------------------------------------------------------------------

door = FrontDoor("TensorFlow Serving REST", errors=error_json)
router = door.router


async def _predict(
    request: Request, model: str, version: str | None, label: str | None
) -> Response:
    if version is not None and not version.isdigit():
        return json_response({"error": f"version must be a number, not '{version[:32]}'"}, 400)

    async def handle(
        gateway: Gateway, body: bytes, ctx: CallContext, headers: Mapping[str, str]
    ) -> tuple[Served, bytes, dict[str, str]]:
        router_ = gateway.dataplane.model(model)
        decoded, form = decode_predict(
            body, model, resolve_version(router_, version, label), router_.config
        )
        served = await gateway.dataplane.infer(model, decoded, ctx)
        return served, encode_predict(served.response, form), {"content-type": "application/json"}

    return await serve_inference(request, PROTOCOL, model, handle, accepted_types=LENIENT_JSON)


@door.post(
    "/v1/models/{model}:predict",
    Kind.INFER,
    model="model",
    fast=True,
    summary="Predict (TF Serving REST)",
)
async def predict(request: Request, model: str) -> Response:
    return await _predict(request, model, None, None)


@door.post(
    "/v1/models/{model}/versions/{version}:predict",
    Kind.INFER,
    model="model",
    fast=True,
    summary="Predict on a version",
)
async def predict_version(request: Request, model: str, version: str) -> Response:
    return await _predict(request, model, version, None)


@door.post(
    "/v1/models/{model}/labels/{label}:predict",
    Kind.INFER,
    model="model",
    fast=True,
    summary="Predict on a version label",
)
async def predict_label(request: Request, model: str, label: str) -> Response:
    return await _predict(request, model, None, label)


def _unsupported(model: str, verb: str) -> Response:
    return json_response(
        {"error": f"DuoServe serves :predict only; :{verb} needs tf.Example inputs"}, 400
    )


@door.post("/v1/models/{model}:classify", Kind.INFER, model="model", include_in_schema=False)
async def classify(model: str) -> Response:
    return _unsupported(model, "classify")


@door.post("/v1/models/{model}:regress", Kind.INFER, model="model", include_in_schema=False)
async def regress(model: str) -> Response:
    return _unsupported(model, "regress")


async def _status(request: Request, model: str, version: str | None, label: str | None) -> Response:
    dataplane = gateway_of(request).dataplane
    router_ = dataplane.model(model)
    if version is not None and not version.isdigit():
        raise BadRequest(f"version must be a number, not '{version[:32]}'")
    if label is not None:
        version = declared_version(router_, label)
    shown = version or router_.config.version
    ready = await dataplane.model_ready(model, version)
    if version is not None and not ready:
        raise NotFound(f"could not find version {version} of model '{model}'")
    state = "AVAILABLE" if ready else "UNAVAILABLE"
    status = {"error_code": "OK", "error_message": ""}
    if not ready:
        status = {"error_code": "UNAVAILABLE", "error_message": "no route can serve it now"}
    return json_response(
        {"model_version_status": [{"version": shown, "state": state, "status": status}]}
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


async def _metadata(
    request: Request, model: str, version: str | None, label: str | None
) -> Response:
    router_ = gateway_of(request).dataplane.model(model)
    config = router_.config
    if label is not None:
        version = declared_version(router_, label)
    signature = {
        "inputs": {s.name: _tensor_info(s) for s in config.inputs},
        "outputs": {s.name: _tensor_info(s) for s in config.outputs},
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    return json_response(
        {
            "model_spec": {
                "name": model,
                "signature_name": "",
                "version": version or config.version,
            },
            "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
        }
    )


@door.get("/v1/models/{model}", Kind.INFER, model="model", summary="Model status (TF Serving REST)")
async def status(request: Request, model: str) -> Response:
    return await _status(request, model, None, None)


@door.get(
    "/v1/models/{model}/versions/{version}",
    Kind.INFER,
    model="model",
    summary="Model version status",
)
async def status_version(request: Request, model: str, version: str) -> Response:
    return await _status(request, model, version, None)


@door.get(
    "/v1/models/{model}/labels/{label}", Kind.INFER, model="model", summary="Model label status"
)
async def status_label(request: Request, model: str, label: str) -> Response:
    return await _status(request, model, None, label)


@door.get(
    "/v1/models/{model}/metadata",
    Kind.INFER,
    model="model",
    summary="Model metadata (TF Serving REST)",
)
async def metadata(request: Request, model: str) -> Response:
    return await _metadata(request, model, None, None)


@door.get(
    "/v1/models/{model}/versions/{version}/metadata",
    Kind.INFER,
    model="model",
    summary="Version metadata",
)
async def metadata_version(request: Request, model: str, version: str) -> Response:
    return await _metadata(request, model, version, None)


@door.get(
    "/v1/models/{model}/labels/{label}/metadata",
    Kind.INFER,
    model="model",
    summary="Label metadata",
)
async def metadata_label(request: Request, model: str, label: str) -> Response:
    return await _metadata(request, model, None, label)
