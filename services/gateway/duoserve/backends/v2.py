"""Any Open Inference Protocol (KServe V2) server as a route target: Triton, MLServer,
KServe runtimes, or another DuoServe. Tensors travel with the binary tensor extension
(``Inference-Header-Content-Length``) both ways, so no tensor data is turned into JSON text."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson

from duoserve.backends.endpoints import ReplicatedBackend, Resolver, resolve_host
from duoserve.backends.http import (
    PROBE_TIMEOUT_S,
    HTTPPool,
    Reply,
    binary_headers,
    call,
    http_endpoints,
    status_error,
)
from duoserve.config import V2BackendConfig
from duoserve.errors import (
    DuoServeError,
    UpstreamError,
)
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tensors import (
    InferenceRequest,
    InferenceResponse,
    Tensor,
    binary_request,
    numpy_dtype,
    split_bytes_elements,
)

log = logging.getLogger(__name__)


WHAT = "Open Inference Protocol"


class V2Backend(ReplicatedBackend[HTTPPool]):
    """Calls ``POST /v2/models/{m}[/versions/{v}]/infer`` on an Open Inference Protocol server
    (one or several replicas, see backends/endpoints.py)."""

    kind = "v2"

    def __init__(
        self,
        name: str,
        config: V2BackendConfig,
        *,
        metrics: Metrics | None = None,
        resolver: Resolver = resolve_host,
    ) -> None:
        super().__init__(name)
        self.config = config
        self.endpoints = http_endpoints(
            name,
            config.url,
            config,
            what=WHAT,
            probe=self._server_ready,
            metrics=metrics,
            resolver=resolver,
        )
        # Read once, like every other credential the gateway holds; a secret mounted from a
        # file often ends in a newline.
        token = os.environ.get(config.token_env, "").strip() if config.token_env else ""
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def _path(self, model: str, version: str | None) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        return path + (f"/versions/{quote(version, safe='')}" if version else "")

    def encode(self, request: InferenceRequest) -> tuple[bytes, int]:
        """JSON header + binary tensors, and the header's length."""
        fields: dict[str, Any] = {"parameters": {"binary_data_output": True}}
        if request.id is not None:
            fields["id"] = request.id
        if request.outputs:
            fields["outputs"] = [
                {"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs
            ]
        return binary_request(request.inputs, **fields)

    async def infer(
        self, request: InferenceRequest, deadline: Deadline, *, avoid: Collection[str] = ()
    ) -> InferenceResponse:
        return await self.endpoints.call(
            lambda pool: self._infer_on(pool, request, deadline), avoid
        )

    async def _infer_on(
        self, pool: HTTPPool, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        body, header_length = self.encode(request)
        headers = {**binary_headers(header_length), **self._auth}
        reply = await call(
            pool,
            "POST",
            self._path(request.model, request.version) + "/infer",
            what=WHAT,
            deadline=deadline,
            body=body,
            headers=headers,
        )
        if reply.status != 200:
            raise self._status_error(reply.status, reply.body, request)
        answer_split = reply.headers.get("inference-header-content-length")
        return self._decode(reply.body, answer_split, request)

    def _status_error(self, status: int, raw: bytes, request: InferenceRequest) -> DuoServeError:
        try:
            message = str(orjson.loads(raw).get("error", ""))[:300]
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return status_error(status, WHAT, f"model '{request.model}'", message)

    def _decode(
        self, raw: bytes, header_length: str | None, request: InferenceRequest
    ) -> InferenceResponse:
        try:
            split = int(header_length) if header_length else len(raw)
            doc = orjson.loads(raw[:split])
            rest = memoryview(raw)[split:]
            outputs = []
            offset = 0
            for item in doc["outputs"]:
                dtype = numpy_dtype(item["datatype"])
                shape = item["shape"]
                size = (item.get("parameters") or {}).get("binary_data_size")
                if size is not None:
                    chunk = rest[offset : offset + size]
                    offset += size
                    if item["datatype"] == "BYTES":
                        count = int(np.prod(shape)) if shape else 1
                        array = split_bytes_elements(bytes(chunk), count, item["name"])
                    else:
                        array = np.frombuffer(chunk, dtype=dtype)
                else:
                    array = np.asarray(item["data"], dtype=dtype)
                outputs.append(Tensor(item["name"], array.reshape(shape), item["datatype"]))
        except (KeyError, TypeError, ValueError, DuoServeError) as error:
            log.warning("backend %s: unexpected V2 answer: %r", self.name, error)
            raise UpstreamError(
                "the V2 server answered in a format the gateway does not understand"
            ) from None
        return InferenceResponse(
            model_name=request.model,
            model_version=doc.get("model_version"),
            outputs=outputs,
            id=request.id,
            parameters={},
        )

    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        """Whether a replica in rotation has the model ready."""
        target = self._path(model, version) + "/ready"

        async def model_ready(pool: HTTPPool) -> bool:
            try:
                return (await self._get(pool, target)).status == 200
            except DuoServeError:
                return False

        return await self.endpoints.first(model_ready)

    async def _server_ready(self, pool: HTTPPool) -> bool:
        """A replica's own health (``GET /v2/health/ready``): whether it may return to rotation."""
        try:
            return (await self._get(pool, "/v2/health/ready")).status == 200
        except DuoServeError:
            return False

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        try:
            reply = await self.endpoints.call(
                lambda pool: self._get(pool, self._path(model, version))
            )
            if reply.status != 200:
                return {}
            doc: dict[str, Any] = orjson.loads(reply.body)
            return doc
        except (orjson.JSONDecodeError, DuoServeError):
            return {}

    async def _get(self, pool: HTTPPool, target: str) -> Reply:
        return await call(
            pool,
            "GET",
            target,
            what=WHAT,
            deadline=Deadline(PROBE_TIMEOUT_S),
            headers=self._auth,
        )
