"""Open Inference Protocol (KServe V2) REST front door, with Triton's binary tensor extension.

The routes stay thin: the payloads are :mod:`duoserve.codecs.v2` (``decode_v2_request``,
``encode_v2_response``), which bounds every input by the model's declared shape before any
array is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from duoserve import __version__
from duoserve.codecs.v2 import (
    BINARY_EXTENSION,
    HEADER_LENGTH,
    compare_report_outputs,
    decode_v2_request,
    encode_v2_response,
    model_metadata,
)
from duoserve.dataplane import CallContext, Served
from duoserve.errors import BadRequest, DuoServeError, NotFound
from duoserve.frontends.http import (
    JSON,
    Gateway,
    call_context,
    check_content_type,
    error_json,
    gateway_of,
    headers_of,
    json_response,
    read_body,
    request_id,
    serve_inference,
    start_trace,
    unanswered,
)
from duoserve.routes import FrontDoor, Kind
from duoserve.tensors import InferenceRequest
from duoserve.tracing import RequestTrace

BINARY_TYPES = (JSON, "application/octet-stream", "application/vnd.triton.binary")


door = FrontDoor("Open Inference Protocol (V2)", errors=error_json)
router = door.router


@door.get("/v2", Kind.OTHER, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return json_response(
        {
            "name": request.app.state.settings.server_name,
            "version": __version__,
            "extensions": [BINARY_EXTENSION, "duoserve_compare"],
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
    headers = headers_of(request)
    rid = request_id(headers)
    trace = start_trace(gateway, request.scope, headers, rid, "v2", model)
    try:
        report = await _compare(gateway, request, model, headers, trace)
    except DuoServeError as error:
        if trace is not None:
            trace.finish(error.status, "none", "none", error)
        raise
    except BaseException as error:
        if trace is not None:
            trace.finish(unanswered(error), "none", "none", error)
        raise
    if trace is not None:
        trace.finish(200, "none", "none", None)
    return json_response(report, headers={"x-request-id": rid})


async def _compare(
    gateway: Gateway,
    request: Request,
    model: str,
    headers: Mapping[str, str],
    trace: RequestTrace | None,
) -> dict[str, Any]:
    # Like /infer, and unlike the TF Serving and TorchServe front doors (whose servers read any
    # body as JSON, so their clients may send curl's form type): a V2 body is JSON, and a form
    # or text body is refused with a 415 that says so rather than guessed at.
    check_content_type(headers, (JSON,))
    body = await read_body(request.receive, headers, gateway.max_body_bytes)
    decoded = decode_v2_request(body, model, None, gateway.dataplane.model(model).config)
    context = call_context(headers, "v2")
    context.trace = trace
    report = await gateway.dataplane.compare(model, decoded, context)
    for entry in report["results"]:
        response = entry.pop("response", None)
        if response is not None:
            entry["outputs"] = compare_report_outputs(response, decoded)
    return report
