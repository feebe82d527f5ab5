"""TorchServe's inference API as a front door: ``POST /predictions/{m}[/{v}]`` and ``GET /ping``.

The body formats are those of DuoServe's TorchServe handler (services/torchserve/handler.py),
so a client of a TorchServe running that handler works unchanged against the gateway, and
reaches either framework (the payloads are :mod:`duoserve.codecs.torchserve`):

- ``{"inputs": [{"name", "shape", "datatype", "data"}]}`` -> ``{"outputs": [...]}`` (tensors)
- ``{"<input>": nested list, ...}`` -> ``{"<output>": nested list, ...}`` (named)
- a bare nested list (the model's single input) -> a bare nested list (its first output)

Errors come back in TorchServe's shape: ``{"code", "type", "message"}``. Management,
registration, token and metrics paths of TorchServe do not exist here.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from duoserve.codecs.torchserve import decode_predictions, encode_predictions
from duoserve.dataplane import CallContext, Served
from duoserve.frontends.http import (
    LENIENT_JSON,
    Gateway,
    gateway_of,
    json_response,
    serve_inference,
    torchserve_error_json,
)
from duoserve.routes import FrontDoor, Kind

PROTOCOL = "torchserve"


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
