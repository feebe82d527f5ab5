"""The ``kind: tfserving`` backend: TF Serving replicas reached over the configured protocol,
gRPC (:mod:`.grpc_api`) or REST (:mod:`.rest_api`), for predictions, status and metadata alike."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from duoserve.backends.endpoints import (
    EndpointSet,
    ReplicatedBackend,
    Resolver,
    endpoint_names,
    resolve_host,
    split_host_port,
)
from duoserve.backends.http import http_endpoints
from duoserve.backends.tfserving.grpc_api import PREDICT, GrpcAPI, GrpcReplica
from duoserve.backends.tfserving.rest_api import RestAPI
from duoserve.config import TensorSpec, TFServingBackendConfig
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse
from duoserve.tracing import CallSpan

Replica = TypeVar("Replica", contravariant=True)


class TFServingAPI(Protocol[Replica]):
    """What the backend calls on one replica, whichever protocol reaches it."""

    async def infer(
        self, replica: Replica, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse: ...

    async def ready(self, replica: Replica, model: str, version: str | None) -> bool: ...

    async def metadata(
        self, replica: Replica, model: str, version: str | None, timeout: float
    ) -> dict[str, Any]: ...


class TFServingBackend(ReplicatedBackend[Any]):
    """TensorFlow models on TensorFlow Serving: one or several replicas (backends/endpoints.py),
    each reached over the configured protocol, gRPC or REST, for predictions, status and
    metadata alike. ``endpoints`` holds a :class:`GrpcReplica` (a channel) per replica over
    gRPC, an HTTPPool over REST."""

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
        self._declared: dict[str, list[TensorSpec]] = {}
        self.api: TFServingAPI[Any]
        if self.rest:
            assert config.url is not None  # the config's own check
            self.api = RestAPI(name, self._declared)
            self.call_span = CallSpan.http(config.url, "/v1/models/{model}:predict")
            self.endpoints = http_endpoints(
                name,
                config.url,
                config,
                what="TF Serving",
                probe=self._healthy,
                metrics=metrics,
                resolver=resolver,
            )
        else:
            self.api = GrpcAPI(name)
            default = split_host_port(config.grpc) if config.grpc else None
            self.call_span = CallSpan.grpc(PREDICT.lstrip("/"), default)
            self.endpoints = EndpointSet(
                name,
                endpoint_names(config.endpoints, default),
                connect=GrpcReplica,
                disconnect=GrpcReplica.close,
                probe=self._healthy,
                what="TF Serving",
                metrics=metrics,
                resolve_interval_s=config.resolve_interval_s,
                slow_start_s=config.slow_start_s,
                outlier=config.outlier,
                resolver=resolver,
            )
        self.coalesce(config.coalesce)

    def register(
        self, framework: str, model: str, inputs: list[TensorSpec], outputs: list[TensorSpec]
    ) -> None:
        """The signature models.yaml declares: names a REST answer's lone output if need be."""
        self._declared.setdefault(model, list(outputs))

    async def infer_on(
        self, replica: Any, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        return await self.api.infer(replica, request, deadline)

    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        """Whether a replica in rotation has any version of the model (or the one asked for)
        AVAILABLE."""
        api = self.api
        return await self.endpoints.first(lambda replica: api.ready(replica, model, version))

    async def _healthy(self, replica: Any) -> bool:
        """A replica's health, to end its ejection: a model it should serve is AVAILABLE."""
        return all([await self.api.ready(replica, model, None) for model in self._declared])

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """``{"model_spec": {...}, "signature_def": {name: {inputs, outputs, method_name}}}``."""
        timeout = self.config.timeout_ms / 1000
        api = self.api
        return await self.endpoints.call(
            lambda replica: api.metadata(replica, model, version, timeout)
        )
