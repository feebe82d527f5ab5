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

import json
import logging
import re
from collections.abc import Collection
from typing import Any
from urllib.parse import quote

import grpc

from duoserve.backends.endpoints import (
    EndpointSet,
    ReplicatedBackend,
    Resolver,
    endpoint_names,
    resolve_host,
    split_host_port,
)
from duoserve.backends.http import PROBE_TIMEOUT_S, HTTPPool, call, http_endpoints, status_error
from duoserve.codecs.tensorproto import (
    any_available,
    decode_metadata,
    decode_predict_response,
    metadata_request,
    predict_request,
    status_request,
)
from duoserve.codecs.tfserving import (
    decode_metadata as decode_metadata_json,
)
from duoserve.codecs.tfserving import (
    is_b64,
    loads_answer,
    output_types,
    predict_body,
    signature_name,
    tensor_from_json,
)
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
from duoserve.protos import get_model_metadata_pb2, get_model_status_pb2, predict_pb2
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"

_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

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


def _what(model: str, version: str | None) -> str:
    return f"model '{model}'" + (f" version '{version}'" if version else "")


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
        return loads_answer(reply.body)

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
        message = predict_request(
            request.model,
            request.version,
            signature_name(request),
            request.inputs,
            [o.name for o in request.outputs or []],
        )
        timeout = deadline.check("the TF Serving call")
        try:
            answer = await self._grpc_call(replica.predict, message, timeout)
        except grpc.aio.AioRpcError as error:
            raise self._grpc_error(error, what, deadline) from None
        return decode_predict_response(answer, request, what)

    async def _infer_rest(
        self, pool: HTTPPool, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        what = _what(request.model, request.version)
        signature = signature_name(request)
        body = predict_body(signature, request.inputs)
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
            doc = loads_answer(reply.body)
            value = doc["outputs"]
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(f"TF Serving answered {what} in an unexpected format") from None
        signature_outputs = await self._signature_outputs(pool, request, signature, deadline)
        requested = [o.name for o in request.outputs] if request.outputs else None
        if isinstance(value, dict) and not is_b64(value):
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
                outputs.append(tensor_from_json(name, named[name], datatype))
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
            # Cached either way: a signature the model lacks stays lacking (no metadata call on
            # every request); only an unreachable metadata endpoint is asked again.
            self._outputs[key] = output_types(meta, signature)
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
            request = status_request(model, version)
            answer = await self._grpc_call(replica.model_status, request, PROBE_TIMEOUT_S)
            return any_available(answer)
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
        request = metadata_request(model, version)
        try:
            answer = await self._grpc_call(replica.model_metadata, request, timeout)
        except grpc.aio.AioRpcError as error:
            raise self._grpc_error(error, _what(model, version), None) from None
        return decode_metadata(answer)

    async def _metadata_rest(
        self, pool: HTTPPool, model: str, version: str | None, timeout: float
    ) -> dict[str, Any]:
        doc = await self._get_json(
            pool, self._rest_path(model, version) + "/metadata", _what(model, version), timeout
        )
        try:
            return decode_metadata_json(doc)
        except (KeyError, TypeError, AttributeError):
            raise UpstreamError("TF Serving answered metadata in an unexpected format") from None
