"""TF Serving's REST API as a front door: an existing TF Serving client works unchanged, against
either framework.

``POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict`` takes ``instances`` (row format) or
``inputs`` (columnar) and answers ``predictions`` or ``outputs`` as TF Serving does: a bare value
when the model has one output, an object keyed by output name when it has several (a list of
such objects, one per row, in row format). Binary values travel as ``{"b64": ...}``.
``GET /v1/models/{m}[...]`` answers model status; ``.../metadata`` the signature. The payloads
are :mod:`duoserve.codecs.tfserving`.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from duoserve.codecs.tfserving import decode_predict, encode_metadata, encode_predict
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

PROTOCOL = "tfserving"


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


async def _metadata(
    request: Request, model: str, version: str | None, label: str | None
) -> Response:
    router_ = gateway_of(request).dataplane.model(model)
    if label is not None:
        version = declared_version(router_, label)
    return json_response(encode_metadata(model, version, router_.config))


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
