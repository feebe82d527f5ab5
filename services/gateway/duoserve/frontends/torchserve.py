"""TorchServe's inference API as a front door: ``POST /predictions/{m}[/{v}]`` and ``GET /ping``.

The body formats are those of DuoServe's TorchServe handler (services/torchserve/handler.py),
so a client of a TorchServe running that handler works unchanged against the gateway, and
reaches either framework:

- ``{"inputs": [{"name", "shape", "datatype", "data"}]}`` -> ``{"outputs": [...]}`` (tensors)
- ``{"<input>": nested list, ...}`` -> ``{"<output>": nested list, ...}`` (named)
- a bare nested list (the model's single input) -> a bare nested list (its first output)

Errors come back in TorchServe's shape: ``{"code", "type", "message"}``. Management,
registration, token and metrics paths of TorchServe do not exist here.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.requests import Request
from starlette.responses import Response

from duoserve.config import ModelConfig
from duoserve.dataplane import CallContext, Served
from duoserve.errors import BadRequest
from duoserve.frontends.http import (
    LENIENT_JSON,
    Gateway,
    gateway_of,
    json_response,
    serve_inference,
    torchserve_error_json,
)
from duoserve.frontends.v2 import decode_v2_request
from duoserve.routes import FrontDoor, Kind
from duoserve.tensors import (
    InferenceRequest,
    InferenceResponse,
    Tensor,
    array_from_json,
    json_tensor,
)

PROTOCOL = "torchserve"


def decode_predictions(
    body: bytes, model_name: str, version: str | None, config: ModelConfig
) -> tuple[InferenceRequest, str]:
    """A /predictions body -> (InferenceRequest, "tensors" | "named" | "bare")."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    if isinstance(doc, dict) and "inputs" in doc:
        return decode_v2_request(body, model_name, version, config, parsed=doc), "tensors"
    specs = config.input_specs
    if isinstance(doc, dict):
        unknown = set(doc) - set(specs)
        if unknown:
            raise BadRequest(
                f"model '{model_name}' has no input(s) {', '.join(sorted(unknown))}; "
                f"its inputs are: {', '.join(specs)}"
            )
        values = doc
        form = "named"
    elif isinstance(doc, list):
        if len(specs) != 1:
            raise BadRequest(
                f"a bare list is accepted for single-input models only; send an object keyed "
                f"by input name ({', '.join(specs)})"
            )
        values = {next(iter(specs)): doc}
        form = "bare"
    else:
        raise BadRequest("send a JSON list (the input) or an object keyed by input name")
    inputs = []
    for name, spec in specs.items():
        if name not in values:
            raise BadRequest(f"model '{model_name}' needs input '{name}'")
        array = array_from_json(values[name], spec.datatype, name)
        limit = spec.max_elements(config.max_batch)
        if array.size > limit:
            raise BadRequest(f"input '{name}' has {array.size} values; at most {limit} allowed")
        inputs.append(Tensor(name, array, spec.datatype))
    return InferenceRequest(model=model_name, inputs=inputs, version=version), form


def encode_predictions(response: InferenceResponse, form: str, model_name: str) -> bytes:
    option = orjson.OPT_SERIALIZE_NUMPY
    if form == "tensors":
        outputs = [json_tensor(t) for t in response.outputs]
        return orjson.dumps({"model_name": model_name, "outputs": outputs}, option=option)
    if form == "bare":
        return orjson.dumps(response.outputs[0].data, option=option)
    return orjson.dumps({t.name: t.data for t in response.outputs}, option=option)


door = FrontDoor("TorchServe inference API", errors=torchserve_error_json)
router = door.router


async def _predict(request: Request, model: str, version: str | None) -> Response:
    async def handle(
        gateway: Gateway, body: bytes, ctx: CallContext, headers: Mapping[str, str]
    ) -> tuple[Served, bytes, dict[str, str]]:
        config = gateway.dataplane.model(model).config
        decoded, form = decode_predictions(body, model, version, config)
        served = await gateway.dataplane.infer(model, decoded, ctx)
        payload = encode_predictions(served.response, form, model)
        return served, payload, {"content-type": "application/json"}

    return await serve_inference(request, PROTOCOL, model, handle, accepted_types=LENIENT_JSON)


@door.post(
    "/predictions/{model}",
    Kind.INFER,
    model="model",
    fast=True,
    summary="Predict (TorchServe inference API)",
)
async def predictions(request: Request, model: str) -> Response:
    return await _predict(request, model, None)


@door.post(
    "/predictions/{model}/{version}",
    Kind.INFER,
    model="model",
    fast=True,
    summary="Predict on a version",
)
async def predictions_version(request: Request, model: str, version: str) -> Response:
    return await _predict(request, model, version)


@door.route(
    "/ping",
    Kind.HEALTH,
    methods=["GET", "HEAD"],
    draining={"status": "Unhealthy", "draining": True},
    summary="Health (TorchServe inference API)",
)
async def ping(request: Request) -> Response:
    healthy = await gateway_of(request).dataplane.ready()
    if healthy:
        return json_response({"status": "Healthy"})
    # TorchServe itself answers 500 here; 503 says the same to probes without a "server error".
    return json_response({"status": "Unhealthy"}, status=503)
