"""Open Inference Protocol (KServe V2) REST front door, with Triton's binary tensor extension.

Codec functions (``decode_v2_request``, ``encode_v2_response``) are separate from the routes,
which stay thin. Tensor data goes from JSON straight to numpy (orjson, no per-element model
validation); every input is bounded by the model's declared shape before any array is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from duoserve import __version__
from duoserve.config import ModelConfig
from duoserve.dataplane import CallContext, Served
from duoserve.errors import BadRequest, NotFound
from duoserve.frontends.http import (
    JSON,
    Gateway,
    call_context,
    check_content_type,
    error_json,
    gateway_of,
    json_response,
    read_body,
    request_id,
    serve_inference,
)
from duoserve.routes import FrontDoor, Kind
from duoserve.tensors import (
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    Tensor,
    array_from_json,
    array_to_json,
    binary_bytes,
    json_data,
    numpy_dtype,
    split_bytes_elements,
)

HEADER_LENGTH = "inference-header-content-length"
BINARY_TYPES = (JSON, "application/octet-stream", "application/vnd.triton.binary")
PLATFORMS = {"pytorch": "pytorch_torchscript", "tensorflow": "tensorflow_savedmodel"}
MAX_DIMS = 16


# -- codec ------------------------------------------------------------------------------


def _loads(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None


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
    doc = _loads(json_part) if parsed is None or header_length is not None else parsed
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
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if params.get("binary_data", binary_all):
            blob = binary_bytes(tensor.data)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            entry["data"] = json_data(tensor)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": outputs}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if request.id is not None:
        doc["id"] = request.id
    if response.parameters:
        doc["parameters"] = response.parameters
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": JSON}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def model_metadata(name: str, config: ModelConfig, frameworks: list[str]) -> dict[str, Any]:
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


# -- routes -----------------------------------------------------------------------------

door = FrontDoor("Open Inference Protocol (V2)", errors=error_json)
router = door.router


@door.get("/v2", Kind.OTHER, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return json_response(
        {
            "name": request.app.state.settings.server_name,
            "version": __version__,
            "extensions": ["binary_tensor_data", "duoserve_compare"],
        }
    )


@door.route("/v2/health/live", Kind.HEALTH, methods=["GET", "HEAD"], summary="Liveness")
async def live() -> Response:
    return json_response({"live": True})


@door.route(
    "/v2/health/ready",
    Kind.HEALTH,
    methods=["GET", "HEAD"],
    draining={"ready": False, "draining": True},
    summary="Readiness: not draining, in-process models loaded",
)
async def ready(request: Request) -> Response:
    dataplane = gateway_of(request).dataplane
    is_ready, models = await dataplane.readiness()
    body = {"ready": is_ready, "models": models, "circuits": dataplane.circuit_states()}
    return json_response(body, status=200 if is_ready else 503)


@door.get("/v2/models", Kind.OTHER, summary="Models served (DuoServe extension)")
async def list_models(request: Request) -> Response:
    dataplane = gateway_of(request).dataplane
    return json_response(
        {"models": [{"name": n, "frameworks": m.frameworks} for n, m in dataplane.models.items()]}
    )


async def _metadata(request: Request, model: str, version: str | None) -> Response:
    dataplane = gateway_of(request).dataplane
    router_ = dataplane.model(model)
    meta = model_metadata(model, router_.config, router_.frameworks)
    if version is not None and meta["versions"] and version not in meta["versions"]:
        raise NotFound(
            f"model '{model}' has no version '{version}' (declared: {', '.join(meta['versions'])})"
        )
    return json_response(meta)


@door.get("/v2/models/{model}", Kind.INFER, model="model", summary="Model metadata")
async def metadata(request: Request, model: str) -> Response:
    return await _metadata(request, model, None)


@door.get(
    "/v2/models/{model}/versions/{version}",
    Kind.INFER,
    model="model",
    summary="Model version metadata",
)
async def version_metadata(request: Request, model: str, version: str) -> Response:
    return await _metadata(request, model, version)


async def _model_ready(request: Request, model: str, version: str | None) -> Response:
    is_ready = await gateway_of(request).dataplane.model_ready(model, version)
    return json_response({"name": model, "ready": is_ready}, status=200 if is_ready else 503)


@door.get("/v2/models/{model}/ready", Kind.INFER, model="model", summary="Model readiness")
async def model_ready(request: Request, model: str) -> Response:
    return await _model_ready(request, model, None)


@door.get(
    "/v2/models/{model}/rollout",
    Kind.ADMIN,
    model="model",
    summary="The model's rollout: phase, target's share, each gate against its threshold, "
    "every decision with its reason (DuoServe extension)",
)
async def rollout_status(request: Request, model: str) -> Response:
    status = gateway_of(request).dataplane.rollout(model).status()
    return json_response(status, headers={"x-request-id": request_id(request.headers)})


@door.get(
    "/v2/models/{model}/versions/{version}/ready",
    Kind.INFER,
    model="model",
    summary="Model version readiness",
)
async def model_version_ready(request: Request, model: str, version: str) -> Response:
    return await _model_ready(request, model, version)


def _timeout_parameter(request: InferenceRequest, ctx: CallContext) -> CallContext:
    """Triton's request parameter ``timeout`` (microseconds) lowers the deadline too."""
    value = request.parameters.get("timeout")
    if value is None:
        return ctx
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise BadRequest("parameter 'timeout' must be a positive number of microseconds")
    ms = value / 1000
    ctx.timeout_ms = ms if ctx.timeout_ms is None else min(ms, ctx.timeout_ms)
    return ctx


async def _infer(request: Request, model: str, version: str | None) -> Response:
    async def handle(
        gateway: Gateway, body: bytes, ctx: CallContext, headers: Mapping[str, str]
    ) -> tuple[Served, bytes, dict[str, str]]:
        router_ = gateway.dataplane.model(model)
        decoded = decode_v2_request(
            body, model, version, router_.config, headers.get(HEADER_LENGTH)
        )
        served = await gateway.dataplane.infer(model, decoded, _timeout_parameter(decoded, ctx))
        payload, headers = encode_v2_response(served.response, decoded, model)
        return served, payload, headers

    return await serve_inference(request, "v2", model, handle, accepted_types=BINARY_TYPES)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "parameters": {"type": "object"},
                                    "data": {},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}


@door.post(
    "/v2/models/{model}/infer",
    Kind.INFER,
    model="model",
    fast=True,
    summary="Inference",
    openapi_extra=INFER_BODY,
)
async def infer(request: Request, model: str) -> Response:
    return await _infer(request, model, None)


@door.post(
    "/v2/models/{model}/versions/{version}/infer",
    Kind.INFER,
    model="model",
    fast=True,
    summary="Inference on a version",
    openapi_extra=INFER_BODY,
)
async def infer_version(request: Request, model: str, version: str) -> Response:
    return await _infer(request, model, version)


@door.post(
    "/v2/models/{model}/compare",
    Kind.ADMIN,
    model="model",
    summary="Run one request on every route and compare the frameworks (DuoServe extension)",
    openapi_extra=INFER_BODY,
)
async def compare(request: Request, model: str) -> Response:
    gateway = gateway_of(request)
    headers = request.headers
    # Like /infer, and unlike the TF Serving and TorchServe front doors (whose servers read any
    # body as JSON, so their clients may send curl's form type): a V2 body is JSON, and a form
    # or text body is refused with a 415 that says so rather than guessed at.
    check_content_type(headers, (JSON,))
    body = await read_body(request.receive, headers, gateway.max_body_bytes)
    decoded = decode_v2_request(body, model, None, gateway.dataplane.model(model).config)
    report = await gateway.dataplane.compare(model, decoded, call_context(headers, "v2"))
    for entry in report["results"]:
        response = entry.pop("response", None)
        if response is not None:
            entry["outputs"] = [
                {
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": t.shape,
                    "data": array_to_json(t.data),
                }
                for t, _ in select_outputs(response, decoded)
            ]
    return json_response(report, headers={"x-request-id": request_id(headers)})
