"""TensorFlow Serving over gRPC (PredictionService, raw tensor bytes) or its REST API.

gRPC (port 8500, the default) sends every input as a TensorProto with ``tensor_content`` (raw
little-endian bytes; BYTES tensors as ``string_val``) on one long-lived channel, using the
gateway's own wire-compatible messages in :mod:`duoserve.protos`, so no TensorFlow is needed.
REST (port 8501) posts the columnar ``{"inputs": {...}}`` JSON on one pooled HTTP session.

Status, metadata and predictions all use the configured protocol, on every replica.

Naming REST outputs: TF Serving answers a signature with a single output with a bare value, no
name. The backend learns the signature's output names and dtypes once per (model, version,
signature) from ``GET .../metadata`` and caches them; a single requested output's name wins,
and without metadata the output declared in models.yaml (via :meth:`register`) names it.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
import orjson

from duoserve.backends.endpoints import (
    EndpointSet,
    ReplicatedBackend,
    Resolver,
    endpoint_names,
    resolve_host,
    split_host_port,
)
from duoserve.backends.http import PROBE_TIMEOUT_S, HTTPPool, call, http_endpoints, status_error
from duoserve.config import TensorSpec, TFServingBackendConfig
from duoserve.errors import (
    BadRequest,
    DuoServeError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from duoserve.metrics import Metrics
from duoserve.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    tensor_pb2,
)
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor, numpy_dtype

log = logging.getLogger(__name__)

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"

DEFAULT_SIGNATURE = "serving_default"
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

DT = tensor_pb2.DataType
# V2 datatype <-> TF DataType
V2_TO_DT: dict[str, tensor_pb2.DataType] = {
    "BOOL": DT.DT_BOOL,
    "UINT8": DT.DT_UINT8,
    "UINT16": DT.DT_UINT16,
    "UINT32": DT.DT_UINT32,
    "UINT64": DT.DT_UINT64,
    "INT8": DT.DT_INT8,
    "INT16": DT.DT_INT16,
    "INT32": DT.DT_INT32,
    "INT64": DT.DT_INT64,
    "FP16": DT.DT_HALF,
    "FP32": DT.DT_FLOAT,
    "FP64": DT.DT_DOUBLE,
    "BYTES": DT.DT_STRING,
}
DT_TO_V2: dict[int, str] = {dt: v2 for v2, dt in V2_TO_DT.items()}
DT_NAME_TO_V2: dict[str, str] = {DT.Name(dt): v2 for dt, v2 in DT_TO_V2.items()}

# Which typed field carries each dtype when a server does not use tensor_content.
_TYPED_FIELD: dict[int, str] = {
    DT.DT_FLOAT: "float_val",
    DT.DT_DOUBLE: "double_val",
    DT.DT_INT32: "int_val",
    DT.DT_INT16: "int_val",
    DT.DT_INT8: "int_val",
    DT.DT_UINT8: "int_val",
    DT.DT_UINT16: "int_val",
    DT.DT_INT64: "int64_val",
    DT.DT_UINT32: "uint32_val",
    DT.DT_UINT64: "uint64_val",
    DT.DT_BOOL: "bool_val",
    DT.DT_STRING: "string_val",
    DT.DT_HALF: "half_val",
}

# gRPC channel options. Keepalive pings only while calls are in flight, and no more often than
# once a minute: gRPC servers (TF Serving included) answer more frequent pings with GOAWAY
# "too_many_pings". Reconnect backoff is capped low so a restarted TF Serving is used again
# within seconds instead of gRPC's default of up to two minutes.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]

_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?")
_ADDRESSES = re.compile(
    r"\b(?:ipv[46]:)?(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|localhost)(?::\d+)?\b"
)


def clean_message(text: str, limit: int = 400) -> str:
    """TF Serving's error text without graph internals, file paths or network addresses."""
    text = text.strip()
    # TensorFlow appends the failing node and its stack after the first line.
    text = text.split("\n\t [[", 1)[0].split("\n", 1)[0]
    text = _PATHS.sub("<path>", text)
    text = _ADDRESSES.sub("<address>", text)
    return text[:limit]


def _model_spec(model: str, version: str | None, signature: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=model)
    if version:
        if version.isdigit():
            spec.version.value = int(version)
        else:
            spec.version_label = version
    if signature is not None:
        spec.signature_name = signature
    return spec


def _what(model: str, version: str | None) -> str:
    return f"model '{model}'" + (f" version '{version}'" if version else "")


def encode_tensor(tensor: Tensor) -> tensor_pb2.TensorProto:
    """A Tensor as TF Serving's TensorProto: raw little-endian bytes, or string_val."""
    dtype = V2_TO_DT.get(tensor.datatype)
    if dtype is None:
        raise BadRequest(f"input '{tensor.name}': TF Serving has no type for {tensor.datatype}")
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.extend(
        tensor_pb2.TensorShapeProto.Dim(size=int(size)) for size in tensor.data.shape
    )
    if dtype == DT.DT_STRING:
        proto.string_val.extend(
            item if isinstance(item, bytes) else str(item).encode("utf-8")
            for item in tensor.data.reshape(-1)
        )
    else:
        array = np.ascontiguousarray(tensor.data, dtype=numpy_dtype(tensor.datatype))
        proto.tensor_content = array.tobytes()
    return proto


def decode_tensor(name: str, proto: tensor_pb2.TensorProto) -> Tensor:
    """A TensorProto (tensor_content or typed values) as a Tensor; UpstreamError if unusable."""
    datatype = DT_TO_V2.get(proto.dtype)
    if datatype is None:
        raise UpstreamError(
            f"output '{name}' has TensorFlow type {DT.Name(proto.dtype)}, "
            "which the gateway cannot return"
        )
    shape = [int(d.size) for d in proto.tensor_shape.dim]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    dtype = numpy_dtype(datatype)
    if proto.tensor_content:
        if datatype == "BYTES":
            raise UpstreamError(f"output '{name}': string tensors cannot use tensor_content")
        data = np.frombuffer(proto.tensor_content, dtype=dtype)
        if data.size != count:
            raise UpstreamError(f"output '{name}': {data.size} values for shape {shape}")
        return Tensor(name, data.reshape(shape), datatype)
    values: Sequence[Any] = getattr(proto, _TYPED_FIELD[proto.dtype])
    if datatype == "BYTES":
        data = np.empty(len(values), dtype=object)
        data[:] = list(values)
    elif datatype == "FP16":
        # half_val carries each float16's 16 bits in an int32.
        data = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        data = np.asarray(values, dtype=dtype)
    if data.size != count:
        # TensorFlow's rule for typed fields: fewer values than elements repeat the last one
        # (a constant tensor may carry one value); none at all means zeros.
        if data.size == 0:
            fill = b"" if datatype == "BYTES" else 0
            data = np.full(count, fill, dtype=dtype)
        elif data.size < count:
            data = np.concatenate([data, np.repeat(data[-1:], count - data.size)])
        else:
            raise UpstreamError(f"output '{name}': {data.size} values for shape {shape}")
    return Tensor(name, data.reshape(shape), datatype)


def _json_value(tensor: Tensor) -> Any:
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


def _predict_body(signature: str, inputs: list[Tensor]) -> bytes:
    doc: dict[str, Any] = {
        "signature_name": signature,
        "inputs": {t.name: _json_value(t) for t in inputs},
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


def _from_json(name: str, value: Any, datatype: str | None) -> Tensor:
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


class GrpcReplica:
    """One TF Serving replica over gRPC: its channel and the methods the gateway calls."""

    def __init__(self, host: str, port: int) -> None:
        target = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        self.channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.predict = self._method(PREDICT, predict_pb2.PredictResponse)
        self.model_status = self._method(
            GET_MODEL_STATUS, get_model_status_pb2.GetModelStatusResponse
        )
        self.model_metadata = self._method(
            GET_MODEL_METADATA, get_model_metadata_pb2.GetModelMetadataResponse
        )

    def _method(self, name: str, response_cls: Any) -> Any:
        return self.channel.unary_unary(
            name,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )

    async def close(self) -> None:
        # Calls still running (a replica that returned from ejection, say) get a moment.
        await self.channel.close(grace=5.0)


class TFServingBackend(ReplicatedBackend[Any]):
    """TensorFlow models on TensorFlow Serving: one or several replicas (backends/endpoints.py),
    each reached over the configured protocol, gRPC or REST, for predictions, status and
    metadata alike."""

    kind = "tfserving"

    def __init__(
        self,
        name: str,
        config: TFServingBackendConfig,
        *,
        metrics: Metrics | None = None,
        resolver: Resolver = resolve_host,
    ) -> None:
        super().__init__(name)
        self.config = config
        self.rest = config.protocol == "rest"
        # (model, version, signature) -> {output name: V2 datatype or None}
        self._outputs: dict[tuple[str, str | None, str], dict[str, str | None] | None] = {}
        self._declared: dict[str, list[TensorSpec]] = {}
        if self.rest:
            assert config.url is not None  # the config's own check
            self.endpoints = http_endpoints(
                name,
                config.url,
                config,
                what="TF Serving",
                probe=self._rest_healthy,
                metrics=metrics,
                resolver=resolver,
            )
        else:
            default = split_host_port(config.grpc) if config.grpc else None
            self.endpoints = EndpointSet(
                name,
                endpoint_names(config.endpoints, default),
                connect=GrpcReplica,
                disconnect=GrpcReplica.close,
                probe=self._grpc_healthy,
                what="TF Serving",
                metrics=metrics,
                resolve_interval_s=config.resolve_interval_s,
                slow_start_s=config.slow_start_s,
                outlier=config.outlier,
                resolver=resolver,
            )

    # -- plumbing -------------------------------------------------------------------------

    def register(
        self, framework: str, model: str, inputs: list[TensorSpec], outputs: list[TensorSpec]
    ) -> None:
        """The signature models.yaml declares: names a REST answer's lone output if need be."""
        self._declared.setdefault(model, list(outputs))

    def _rest_path(self, model: str, version: str | None) -> str:
        path = f"/v1/models/{quote(model, safe='')}"
        if version:
            kind = "versions" if version.isdigit() else "labels"
            path += f"/{kind}/{quote(version, safe='')}"
        return path

    async def _grpc_call(self, method: Any, request: Any, timeout: float) -> Any:
        """One unary call; a channel closed under it (shutdown) is Unavailable."""
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.UsageError as error:
            raise Unavailable(f"TF Serving backend '{self.name}' is closed") from error

    # -- errors ---------------------------------------------------------------------------

    def _grpc_error(
        self, error: grpc.aio.AioRpcError, what: str, deadline: Deadline | None
    ) -> DuoServeError:
        code = error.code()
        detail = clean_message(error.details() or "")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return BadRequest(detail or f"TF Serving rejected the input of {what}")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(
                f"{what} is not available on TF Serving backend '{self.name}'"
                + (f": {detail}" if detail else "")
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(
                f"TF Serving backend '{self.name}' is not reachable", reason="backend_down"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            budget = f" ({deadline.budget_s * 1000:.0f} ms)" if deadline else ""
            return UpstreamTimeout(
                f"TF Serving did not answer for {what} before the deadline{budget}"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if "larger than max" in (error.details() or ""):
                return PayloadTooLarge("the request is larger than the gRPC message size limit")
            return Overloaded(f"TF Serving is at capacity for {what}; retry shortly")
        log.warning("backend %s: TF Serving answered %s: %s", self.name, code.name, detail)
        return UpstreamError(f"TF Serving failed running {what} ({code.name})")

    def _http_error(self, status: int, raw: bytes, what: str) -> DuoServeError:
        try:
            doc = json.loads(raw)
            detail = clean_message(str(doc.get("error", ""))) if isinstance(doc, dict) else ""
        except (ValueError, UnicodeDecodeError):
            detail = ""
        if status == 503:  # TF Serving's UNAVAILABLE: the server, not its queue
            return Unavailable(
                f"TF Serving backend '{self.name}' is unavailable", reason="backend_down"
            )
        if status not in (400, 404, 413, 429, 408, 504):
            log.warning("backend %s: TF Serving answered HTTP %s: %s", self.name, status, detail)
        return status_error(status, "TF Serving", what, detail)

    async def _get_json(self, pool: HTTPPool, target: str, what: str, timeout: float) -> Any:
        reply = await call(pool, "GET", target, what="TF Serving", deadline=Deadline(timeout))
        if reply.status != 200:
            raise self._http_error(reply.status, reply.body, what)
        return _loads(reply.body)

    # -- inference ------------------------------------------------------------------------

    async def infer(
        self, request: InferenceRequest, deadline: Deadline, *, avoid: Collection[str] = ()
    ) -> InferenceResponse:
        if self.rest:
            return await self.endpoints.call(
                lambda pool: self._infer_rest(pool, request, deadline), avoid
            )
        return await self.endpoints.call(
            lambda replica: self._infer_grpc(replica, request, deadline), avoid
        )

    async def _infer_grpc(
        self, replica: GrpcReplica, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        what = _what(request.model, request.version)
        signature = str(request.parameters.get("signature_name") or DEFAULT_SIGNATURE)
        message = predict_pb2.PredictRequest(
            model_spec=_model_spec(request.model, request.version, signature),
            output_filter=[o.name for o in request.outputs or []],
        )
        for tensor in request.inputs:
            message.inputs[tensor.name].CopyFrom(encode_tensor(tensor))
        timeout = deadline.check("the TF Serving call")
        try:
            answer = await self._grpc_call(replica.predict, message, timeout)
        except grpc.aio.AioRpcError as error:
            raise self._grpc_error(error, what, deadline) from None
        names = [o.name for o in request.outputs] if request.outputs else list(answer.outputs)
        outputs = []
        for name in names:
            if name not in answer.outputs:
                raise UpstreamError(f"TF Serving's answer for {what} lacks output '{name}'")
            outputs.append(decode_tensor(name, answer.outputs[name]))
        version = (
            str(answer.model_spec.version.value)
            if answer.model_spec.HasField("version")
            else request.version
        )
        return InferenceResponse(
            model_name=request.model, model_version=version, outputs=outputs, id=request.id
        )

    async def _infer_rest(
        self, pool: HTTPPool, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        what = _what(request.model, request.version)
        signature = str(request.parameters.get("signature_name") or DEFAULT_SIGNATURE)
        body = _predict_body(signature, request.inputs)
        target = self._rest_path(request.model, request.version) + ":predict"
        reply = await call(
            pool,
            "POST",
            target,
            what="TF Serving",
            deadline=deadline,
            body=body,
            headers={"Content-Type": "application/json"},
        )
        if reply.status != 200:
            raise self._http_error(reply.status, reply.body, what)
        try:
            doc = _loads(reply.body)
            value = doc["outputs"]
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(f"TF Serving answered {what} in an unexpected format") from None
        signature_outputs = await self._signature_outputs(pool, request, signature, deadline)
        requested = [o.name for o in request.outputs] if request.outputs else None
        if isinstance(value, dict) and not (set(value) == {"b64"}):
            named = value
        else:
            named = {self._lone_output_name(request, requested, signature_outputs): value}
        names = requested or list(named)
        outputs = []
        for name in names:
            if name not in named:
                raise BadRequest(f"{what} has no output '{name}'")
            datatype = (signature_outputs or {}).get(name) or self._declared_type(request, name)
            try:
                outputs.append(_from_json(name, named[name], datatype))
            except (ValueError, TypeError, DuoServeError):
                raise UpstreamError(
                    f"TF Serving's output '{name}' of {what} is malformed"
                ) from None
        return InferenceResponse(
            model_name=request.model, model_version=request.version, outputs=outputs, id=request.id
        )

    def _lone_output_name(
        self,
        request: InferenceRequest,
        requested: list[str] | None,
        signature_outputs: dict[str, str | None] | None,
    ) -> str:
        if requested and len(requested) == 1:
            return requested[0]
        if signature_outputs and len(signature_outputs) == 1:
            return next(iter(signature_outputs))
        declared = self._declared.get(request.model, [])
        if len(declared) == 1:
            return declared[0].name
        return "output_0"

    def _declared_type(self, request: InferenceRequest, name: str) -> str | None:
        for spec in self._declared.get(request.model, []):
            if spec.name == name:
                return spec.datatype
        return None

    async def _signature_outputs(
        self, pool: HTTPPool, request: InferenceRequest, signature: str, deadline: Deadline
    ) -> dict[str, str | None] | None:
        """Output names and V2 types of the signature, from TF Serving's metadata (cached)."""
        key = (request.model, request.version, signature)
        if key not in self._outputs:
            try:
                meta = await self._metadata_rest(
                    pool,
                    request.model,
                    request.version,
                    min(deadline.remaining(), PROBE_TIMEOUT_S),
                )
            except DuoServeError as error:
                log.info("backend %s: no metadata for %s: %s", self.name, key, error.message)
                return None
            sig = meta["signature_def"].get(signature)
            # Cached either way: a signature the model lacks stays lacking (no metadata call on
            # every request); only an unreachable metadata endpoint is asked again.
            self._outputs[key] = (
                None
                if sig is None
                else {
                    name: DT_NAME_TO_V2.get(info.get("dtype", ""))
                    for name, info in sig["outputs"].items()
                }
            )
        return self._outputs[key]

    # -- status and metadata --------------------------------------------------------------

    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        """Whether a replica in rotation has any version of the model (or the one asked for)
        AVAILABLE."""
        if self.rest:
            return await self.endpoints.first(lambda pool: self._rest_ready(pool, model, version))
        return await self.endpoints.first(lambda replica: self._grpc_ready(replica, model, version))

    async def _rest_ready(self, pool: HTTPPool, model: str, version: str | None) -> bool:
        try:
            doc = await self._get_json(
                pool, self._rest_path(model, version), _what(model, version), PROBE_TIMEOUT_S
            )
            return any(s.get("state") == "AVAILABLE" for s in doc["model_version_status"])
        except Exception:  # noqa: BLE001 - a probe reports False, it never raises
            return False

    async def _grpc_ready(self, replica: GrpcReplica, model: str, version: str | None) -> bool:
        try:
            request = get_model_status_pb2.GetModelStatusRequest(
                model_spec=_model_spec(model, version, None)
            )
            answer = await self._grpc_call(replica.model_status, request, PROBE_TIMEOUT_S)
            available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            return any(s.state == available for s in answer.model_version_status)
        except Exception:  # noqa: BLE001 - a probe reports False, it never raises
            return False

    async def _rest_healthy(self, pool: HTTPPool) -> bool:
        """A replica's health, to end its ejection: a model it should serve is AVAILABLE."""
        return all([await self._rest_ready(pool, model, None) for model in self._declared])

    async def _grpc_healthy(self, replica: GrpcReplica) -> bool:
        return all([await self._grpc_ready(replica, model, None) for model in self._declared])

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """``{"model_spec": {...}, "signature_def": {name: {inputs, outputs, method_name}}}``."""
        timeout = self.config.timeout_ms / 1000
        if self.rest:
            return await self.endpoints.call(
                lambda pool: self._metadata_rest(pool, model, version, timeout)
            )
        return await self.endpoints.call(
            lambda replica: self._metadata_grpc(replica, model, version, timeout)
        )

    async def _metadata_grpc(
        self, replica: GrpcReplica, model: str, version: str | None, timeout: float
    ) -> dict[str, Any]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=_model_spec(model, version, None), metadata_field=["signature_def"]
        )
        try:
            answer = await self._grpc_call(replica.model_metadata, request, timeout)
        except grpc.aio.AioRpcError as error:
            raise self._grpc_error(error, _what(model, version), None) from None
        if "signature_def" not in answer.metadata:
            raise UpstreamError("TF Serving's metadata lacks signature_def")
        # The Any names tensorflow.serving.SignatureDefMap: same bytes as ours, other name.
        signatures = get_model_metadata_pb2.SignatureDefMap.FromString(
            answer.metadata["signature_def"].value
        )
        return {
            "model_spec": {
                "name": answer.model_spec.name,
                "version": str(answer.model_spec.version.value),
            },
            "signature_def": {
                key: {
                    "method_name": sig.method_name,
                    "inputs": {n: _info(i.dtype, i.tensor_shape) for n, i in sig.inputs.items()},
                    "outputs": {n: _info(i.dtype, i.tensor_shape) for n, i in sig.outputs.items()},
                }
                for key, sig in signatures.signature_def.items()
            },
        }

    async def _metadata_rest(
        self, pool: HTTPPool, model: str, version: str | None, timeout: float
    ) -> dict[str, Any]:
        doc = await self._get_json(
            pool, self._rest_path(model, version) + "/metadata", _what(model, version), timeout
        )
        try:
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
        except (KeyError, TypeError, AttributeError):
            raise UpstreamError("TF Serving answered metadata in an unexpected format") from None


def _info(dtype: int, shape: tensor_pb2.TensorShapeProto) -> dict[str, Any]:
    return {
        "dtype": DT.Name(dtype) if dtype in DT.values() else str(dtype),
        "shape": None if shape.unknown_rank else [int(d.size) for d in shape.dim],
    }


def _info_json(info: dict[str, Any]) -> dict[str, Any]:
    shape = info.get("tensor_shape", {})
    return {
        "dtype": info.get("dtype", "DT_INVALID"),
        "shape": None
        if shape.get("unknown_rank")
        else [int(d.get("size", 0)) for d in shape.get("dim", [])],
    }


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # TF Serving writes NaN and Infinity as bare tokens, which only a lenient parser takes.
        return json.loads(raw)
