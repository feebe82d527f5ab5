"""TF Serving's gRPC API (port 8500) with the official tensorflow_serving servicer stubs.

PredictionService.Predict / GetModelMetadata and ModelService.GetModelStatus, answering with TF
Serving's status codes and messages (model_servers/prediction_service_impl.cc,
model_service_impl.cc, servables/tensorflow/get_model_metadata_impl.cc).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.tfserving_standin.metrics import ServingMetrics
from tests.tfserving_standin.models import (
    DEFAULT_SIGNATURE,
    ModelRegistry,
    ServingError,
    from_tensor_proto,
    invalid,
    to_tensor_proto,
)


def _version_of(spec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ServingMetrics,
        run_predict: Callable[..., Awaitable[dict[str, np.ndarray]]],
        tensor_content: bool,
        received: collections.deque[dict[str, str | None]] | None = None,
    ) -> None:
        self.received = received if received is not None else collections.deque(maxlen=100)
        self.registry = registry
        self.metrics = metrics
        self.run_predict = run_predict
        self.tensor_content = tensor_content

    async def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        started = time.perf_counter()
        status = "OK"
        metadata = dict(context.invocation_metadata() or ())
        self.received.append(
            {
                "api": "grpc",
                "traceparent": metadata.get("traceparent"),
                "tracestate": metadata.get("tracestate"),
            }
        )
        try:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            version, label = _version_of(request.model_spec)
            servable = self.registry.resolve(request.model_spec.name, version, label)
            signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            inputs = {name: from_tensor_proto(t) for name, t in request.inputs.items()}
            outputs = await self.run_predict(
                servable, signature_name, inputs, list(request.output_filter)
            )
            response = predict_pb2.PredictResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature_name
            for name, array in outputs.items():
                response.outputs[name].CopyFrom(
                    to_tensor_proto(array, as_content=self.tensor_content)
                )
            return response
        except ServingError as error:
            status = error.code.name
            await context.abort(error.code, error.message)
        except asyncio.CancelledError:
            status = "CANCELLED"  # the client's deadline passed
            raise
        finally:
            micros = (time.perf_counter() - started) * 1e6
            self.metrics.record(request.model_spec.name, status, "Predict", "GRPC", micros)

    async def GetModelMetadata(self, request, context):  # noqa: N802
        try:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise invalid(f"Metadata field {','.join(fields) or '(none)'} is not supported")
            version, label = _version_of(request.model_spec)
            servable = self.registry.resolve(request.model_spec.name, version, label)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for key, signature in servable.signature_defs.items():
                signature_map.signature_def[key].CopyFrom(signature)
            response.metadata["signature_def"].Pack(signature_map)
            return response
        except ServingError as error:
            await context.abort(error.code, error.message)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def GetModelStatus(self, request, context):  # noqa: N802
        try:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            version, _label = _version_of(request.model_spec)
            response = get_model_status_pb2.GetModelStatusResponse()
            for number, state in self.registry.status(request.model_spec.name, version):
                item = response.model_version_status.add(version=number)
                item.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
                item.status.SetInParent()  # error_code OK, as ToStatusProto(health) writes
            return response
        except ServingError as error:
            await context.abort(error.code, error.message)


async def serve_grpc(
    registry: ModelRegistry,
    metrics: ServingMetrics,
    run_predict: Callable[..., Awaitable[dict[str, np.ndarray]]],
    port: int,
    *,
    tensor_content: bool = False,
    host: str = "127.0.0.1",
    received: collections.deque[dict[str, str | None]] | None = None,
) -> grpc.aio.Server:
    # TF Serving's default max message size is INT_MAX; 256 MiB is plenty for tests.
    limit = 256 * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(registry, metrics, run_predict, tensor_content, received), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(registry), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server
