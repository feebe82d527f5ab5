"""TF Serving's gRPC API (port 8500) on one replica: PredictionService/Predict with every input
a TensorProto of raw ``tensor_content`` (BYTES as ``string_val``), ModelService/GetModelStatus
and PredictionService/GetModelMetadata, on one long-lived channel per replica."""

from __future__ import annotations

from typing import Any

import grpc

from duoserve.backends.http import PROBE_TIMEOUT_S
from duoserve.backends.tfserving.errors import describe, grpc_error
from duoserve.codecs.tensorproto import (
    any_available,
    decode_metadata,
    decode_predict_response,
    metadata_request,
    predict_request,
    status_request,
)
from duoserve.codecs.tfserving import signature_name
from duoserve.errors import Unavailable
from duoserve.protos import get_model_metadata_pb2, get_model_status_pb2, predict_pb2
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"

_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# gRPC channel options. Keepalive pings only while calls are in flight, and no more often than
# once a minute: gRPC servers (TF Serving included) answer more frequent pings with GOAWAY
# "too_many_pings". Reconnect backoff is capped low so a restarted TF Serving is used again
# within seconds instead of gRPC's default of up to two minutes. Each channel keeps its own
# connections (a local subchannel pool): by default channels to the same address with the same
# options share one connection and its reconnect backoff, so the fresh channel an ejected
# replica's probe opens would inherit the backoff its failed probes grew, and a restarted replica
# would wait up to max_reconnect_backoff_ms (plus jitter) before any probe could pass.
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
    ("grpc.use_local_subchannel_pool", 1),
]


class GrpcReplica:
    """One TF Serving replica over gRPC: its channel and the methods the gateway calls."""

    def __init__(self, host: str, port: int) -> None:
        self.connect_to = (host, port)
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


class GrpcAPI:
    """Predictions, status and metadata of backend ``name`` over gRPC, on the replica given."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def _call(
        self, method: Any, request: Any, timeout: float, metadata: Any = None
    ) -> Any:
        """One unary call; a channel closed under it (shutdown) is Unavailable."""
        try:
            return await method(request, timeout=timeout, metadata=metadata)
        except grpc.aio.UsageError as error:
            raise Unavailable(f"TF Serving backend '{self.name}' is closed") from error

    async def infer(
        self, replica: GrpcReplica, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        what = describe(request.model, request.version)
        message = predict_request(
            request.model,
            request.version,
            signature_name(request),
            request.inputs,
            [o.name for o in request.outputs or []],
        )
        timeout = deadline.check("the TF Serving call")
        trace = request.trace
        metadata = None
        if trace is not None:
            # The trace context goes as gRPC metadata (lowercase keys, as HTTP/2 sends them).
            trace.peer = replica.connect_to
            trace.target = PREDICT
            metadata = tuple(trace.headers.items()) or None
        try:
            answer = await self._call(replica.predict, message, timeout, metadata)
        except grpc.aio.AioRpcError as error:
            if trace is not None:
                trace.status = error.code().name
            raise grpc_error(self.name, error, what, deadline) from None
        if trace is not None:
            trace.status = "OK"
        return decode_predict_response(answer, request, what)

    async def ready(self, replica: GrpcReplica, model: str, version: str | None) -> bool:
        """Whether the replica has any version of the model (or the one asked for) AVAILABLE."""
        try:
            request = status_request(model, version)
            answer = await self._call(replica.model_status, request, PROBE_TIMEOUT_S)
            return any_available(answer)
        except Exception:  # noqa: BLE001 - a probe reports False, it never raises
            return False

    async def metadata(
        self, replica: GrpcReplica, model: str, version: str | None, timeout: float
    ) -> dict[str, Any]:
        request = metadata_request(model, version)
        try:
            answer = await self._call(replica.model_metadata, request, timeout)
        except grpc.aio.AioRpcError as error:
            raise grpc_error(self.name, error, describe(model, version), None) from None
        return decode_metadata(answer)
