"""TF Serving's REST API (port 8501) on aiohttp.

Routes and error handling as model_servers/http_rest_api_util.cc and http_rest_api_handler.cc:
the same path regexes, `{"error": "..."}` bodies, the status-code table of http_server.cc, the
JSON of util/json_tensor.cc (row `instances` -> `predictions`, columnar `inputs` -> `outputs`,
a bare value when the signature has one output, `{"b64": ...}` for binary strings).
"""

from __future__ import annotations

import base64
import collections
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from tests.tfserving_standin.metrics import ServingMetrics
from tests.tfserving_standin.models import ModelRegistry, ServingError, invalid

PREDICTION_PATH = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:"
    r"(classify|regress|predict)"
)
STATUS_PATH = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?"
)

# model_servers/http_server.cc ToHTTPStatusCode
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def _json(body: Any, status: int = 200) -> web.Response:
    # json (not orjson): TF Serving writes NaN / Infinity tokens, which strict JSON lacks.
    return web.Response(
        text=json.dumps(body, indent=1), status=status, content_type="application/json"
    )


def _error(error: ServingError) -> web.Response:
    return _json({"error": error.message}, HTTP_STATUS.get(error.code, 500))


def _to_array(value: Any, dtype: tf.DType) -> np.ndarray:
    """A JSON value as a tensor of the signature's dtype (json_tensor.cc FillTensorProto)."""
    if dtype == tf.string:

        def decode(item: Any) -> Any:
            if isinstance(item, list):
                return [decode(i) for i in item]
            if isinstance(item, dict) and set(item) == {"b64"}:
                return base64.b64decode(item["b64"])
            if isinstance(item, str):
                return item.encode()
            raise invalid(
                f"JSON Value: {json.dumps(item)} Type: Number is not of expected type: string"
            )

        return np.array(decode(value), dtype=object)
    try:
        array = np.array(value, dtype=dtype.as_numpy_dtype)
    except (ValueError, TypeError) as error:
        raise invalid(f"Failed to process input: {error}") from None
    return array


def _to_json_value(name: str, array: np.ndarray) -> Any:
    if array.dtype.kind in ("O", "S"):
        as_b64 = name.endswith("_bytes")  # json_tensor.cc: *_bytes outputs are binary

        def encode(item: Any) -> Any:
            if isinstance(item, list):
                return [encode(i) for i in item]
            if as_b64:
                return {"b64": base64.b64encode(item).decode()}
            return item.decode("utf-8", errors="replace")

        return encode(array.tolist())
    return array.tolist()


def _parse_inputs(body: dict[str, Any], signature) -> tuple[dict[str, np.ndarray], str]:
    names = sorted(signature.inputs)
    dtypes = {name: tf.dtypes.as_dtype(signature.inputs[name].dtype) for name in names}
    has_instances, has_inputs = "instances" in body, "inputs" in body
    if has_instances and has_inputs:
        raise invalid(
            "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist "
        )
    if has_instances:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise invalid("Excepting 'instances' to be an list/array")
        if not instances:
            raise invalid("No values in 'instances' array")
        named = isinstance(instances[0], dict) and set(instances[0]) != {"b64"}
        if not named:
            if len(names) > 1:
                raise invalid(
                    "instances is a plain list, but expecting list of objects as multiple "
                    "input tensors required as per tensorinfo_map"
                )
            return {names[0]: _to_array(instances, dtypes[names[0]])}, "row"
        columns: dict[str, list[Any]] = {name: [] for name in names}
        for index, item in enumerate(instances):
            if not isinstance(item, dict) or set(item) != set(names):
                raise invalid(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{json.dumps(item)} must only have keys: {','.join(names)}"
                )
            for name in names:
                columns[name].append(item[name])
        return {name: _to_array(columns[name], dtypes[name]) for name in names}, "row"
    if has_inputs:
        value = body["inputs"]
        if not isinstance(value, dict) or set(value) == {"b64"}:
            if len(names) > 1:
                raise invalid(
                    "inputs is a plain value/list, but expecting an object as multiple "
                    "input tensors required as per tensorinfo_map"
                )
            return {names[0]: _to_array(value, dtypes[names[0]])}, "columnar"
        arrays = {}
        for name in names:
            if name not in value:
                raise invalid(f"Missing named input: {name} in 'inputs' object.")
            arrays[name] = _to_array(value[name], dtypes[name])
        return arrays, "columnar"
    raise invalid("Missing 'inputs' or 'instances' key")


def _format_outputs(outputs: dict[str, np.ndarray], form: str) -> dict[str, Any]:
    names = sorted(outputs)
    if form == "columnar":
        if len(names) == 1:
            return {"outputs": _to_json_value(names[0], outputs[names[0]])}
        return {"outputs": {name: _to_json_value(name, outputs[name]) for name in names}}
    batch = None
    for name in names:
        if outputs[name].ndim == 0:
            raise invalid(f"Tensor name: {name} has no shape information ")
        size = outputs[name].shape[0]
        if batch is not None and size != batch:
            raise invalid(
                f"Tensor name: {name} has inconsistent batch size: {size} expecting: {batch}"
            )
        batch = size
    rows = {name: _to_json_value(name, outputs[name]) for name in names}
    if len(names) == 1:
        return {"predictions": rows[names[0]]}
    return {"predictions": [{name: rows[name][i] for name in names} for i in range(batch or 0)]}


def _model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name)
    if version is not None:
        spec.version.value = int(version)
    if label is not None:
        spec.version_label = label
    return spec


class RestApi:
    """aiohttp handlers over a ModelRegistry."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ServingMetrics,
        run_predict: Callable[..., Awaitable[dict[str, np.ndarray]]],
        monitoring_path: str | None,
        controls: dict[str, float],
        received: collections.deque[dict[str, str | None]] | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.run_predict = run_predict
        self.monitoring_path = monitoring_path
        self.controls = controls
        self.received = received if received is not None else collections.deque(maxlen=100)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if self.monitoring_path and path == self.monitoring_path:
            return web.Response(text=self.metrics.render(), content_type="text/plain")
        if path == "/standin/delay" and request.method == "POST":
            # Not TF Serving's: lets tests turn this server slow (or fast again) while it runs.
            self.controls["delay_ms"] = float(request.query.get("ms", "0"))
            return _json({"delay_ms": self.controls["delay_ms"]})
        if path == "/standin/stats" and request.method == "GET":
            # Not TF Serving's either: how many predictions this replica ran (REST and gRPC),
            # so balancing tests count what each replica saw, not what the gateway says.
            # And the trace context the last Predicts carried (tracing tests).
            return _json(
                {"predicts": self.controls["predicts"], "trace_contexts": list(self.received)}
            )
        if not re.fullmatch(r"(?i)/v1/.*", path):
            return web.Response(status=404, text="")
        try:
            if request.method == "POST" and (match := PREDICTION_PATH.fullmatch(path)):
                name, version, label, method = match.groups()
                if method.lower() != "predict":
                    raise ServingError(
                        grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by the stand-in"
                    )
                self.received.append(
                    {
                        "api": "rest",
                        "traceparent": request.headers.get("traceparent"),
                        "tracestate": request.headers.get("tracestate"),
                    }
                )
                return await self.predict(name, version, label, await request.read())
            if request.method == "GET" and (match := STATUS_PATH.fullmatch(path)):
                name, version, label, subresource = match.groups()
                if not name:
                    raise invalid("Missing model name in request.")
                if version and label:
                    raise invalid(
                        f"Both model version ({version}) and model version label ({label}) "
                        "cannot be supplied."
                    )
                if subresource:
                    return self.metadata(name, version, label)
                return self.status(name, version)
            raise invalid(f"Malformed request: {request.method} {path}")
        except ServingError as error:
            return _error(error)

    async def predict(
        self, name: str, version: str | None, label: str | None, raw: bytes
    ) -> web.Response:
        started = time.perf_counter()
        status = "OK"
        try:
            if not raw:
                raise invalid("JSON Parse error: The document is empty")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise invalid(f"JSON Parse error: {error}") from None
            if not isinstance(body, dict):
                raise invalid("JSON Parse error: Is not object")
            signature_name = body.get("signature_name", "")
            if not isinstance(signature_name, str):
                raise invalid("'signature_name' key must be a string value.")
            servable = self.registry.resolve(name, int(version) if version else None, label)
            inputs, form = _parse_inputs(body, servable.signature(signature_name))
            outputs = await self.run_predict(servable, signature_name, inputs, [])
            return _json(_format_outputs(outputs, form))
        except ServingError as error:
            status = error.code.name
            return _error(error)
        finally:
            micros = (time.perf_counter() - started) * 1e6
            self.metrics.record(name, status, "predict", "REST", micros)

    def status(self, name: str, version: str | None) -> web.Response:
        response = get_model_status_pb2.GetModelStatusResponse()
        for number, state in self.registry.status(name, int(version) if version else None):
            item = response.model_version_status.add(version=number)
            item.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
            item.status.SetInParent()  # error_code OK, as ToStatusProto(health) writes
        body = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
        return _json(body)

    def metadata(self, name: str, version: str | None, label: str | None) -> web.Response:
        servable = self.registry.resolve(name, int(version) if version else None, label)
        spec = _model_spec(name, str(servable.version), None)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature)
        options = {
            "preserving_proto_field_name": True,
            "always_print_fields_with_no_presence": True,
        }
        # http_rest_api_util.cc ToJsonString: the SignatureDefMap's own JSON under
        # metadata.signature_def, hence signature_def twice.
        return _json(
            {
                "model_spec": json_format.MessageToDict(spec, **options),
                "metadata": {"signature_def": json_format.MessageToDict(signature_map, **options)},
            }
        )


async def serve_rest(api: RestApi, port: int, host: str = "127.0.0.1") -> web.AppRunner:
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
