"""Any Open Inference Protocol (KServe V2) server as a route target: Triton, MLServer,
KServe runtimes, or another DuoServe.

Tensors travel with the binary tensor extension (``Inference-Header-Content-Length``; raw
bytes both ways, no tensor turned into JSON text) to servers that implement it, and as V2 JSON
to those that do not: the extension is optional, and MLServer 1.7, for one, reads a binary
body as malformed JSON (a 422, or a 500 when the bytes are not UTF-8). Which one a server
speaks is what its ``GET /v2`` says: binary only where ``extensions`` lists
``binary_tensor_data``. The answer is kept per replica, because the replicas behind one name
need not be the same server (a migration from MLServer to Triton behind one Service, a version
skew mid rollout): it is asked at start, on a replica's first call (one that joined through
DNS), and on the fresh connection pool of a replica that returns from ejection, before it
takes traffic again. A replica that refuses a binary body as unreadable (the server behind its
address was replaced) is asked again, and the call resent as JSON when it no longer lists the
extension. ``binary_tensors: true | false`` in models.yaml fixes the choice instead, without
asking."""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from duoserve.backends.endpoints import ReplicatedBackend, Resolver, resolve_host
from duoserve.backends.http import (
    PROBE_TIMEOUT_S,
    HTTPPool,
    Reply,
    call,
    http_endpoints,
    server_message,
    status_error,
)
from duoserve.codecs.v2 import (
    BINARY_EXTENSION,
    HEADER_LENGTH,
    decode_v2_response,
    encode_v2_request,
)
from duoserve.config import V2BackendConfig
from duoserve.errors import (
    DuoServeError,
    UpstreamError,
    UpstreamTimeout,
)
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse
from duoserve.tracing import CallSpan

log = logging.getLogger(__name__)


WHAT = "Open Inference Protocol"


@dataclass(slots=True)
class _Wire:
    """What one replica's server speaks: binary tensors or JSON (None: not asked yet)."""

    binary: bool | None = None
    asking: asyncio.Lock = field(default_factory=asyncio.Lock)


class V2Backend(ReplicatedBackend[HTTPPool]):
    """Calls ``POST /v2/models/{m}[/versions/{v}]/infer`` on an Open Inference Protocol server
    (one or several replicas, see backends/endpoints.py), binary or JSON per replica."""

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
        self.call_span = CallSpan.http(config.url, "/v2/models/{model}/infer")
        # Read once, like every other credential the gateway holds; a secret mounted from a
        # file often ends in a newline.
        token = os.environ.get(config.token_env, "").strip() if config.token_env else ""
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        fixed = config.binary_tensors
        self._fixed: bool | None = fixed if isinstance(fixed, bool) else None
        self.coalesce(config.coalesce)
        # Per replica, keyed by its connection pool: a pool that is replaced (a replica back
        # from ejection gets a fresh one) or dropped (a replica that left) takes its answer along.
        self._wires: weakref.WeakKeyDictionary[HTTPPool, _Wire] = weakref.WeakKeyDictionary()

    async def start(self) -> None:
        """Resolve the replicas, then ask each what it speaks (all at once; one that does not
        answer now is asked again on its first call)."""
        await super().start()
        if self._fixed is None:
            pools = [e.transport for e in self.endpoints.endpoints.values()]
            await asyncio.gather(
                *(self._binary_on(pool, Deadline(PROBE_TIMEOUT_S)) for pool in pools),
                return_exceptions=True,
            )

    def _path(self, model: str, version: str | None) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        return path + (f"/versions/{quote(version, safe='')}" if version else "")

    # -- what each replica speaks ---------------------------------------------------------

    async def _binary_on(self, pool: HTTPPool, deadline: Deadline) -> bool:
        """Whether to send binary tensors to this replica: the setting, else its ``GET /v2``
        (asked once per pool; calls that arrive meanwhile wait for that one answer). A replica
        that cannot be reached raises as any call to it would, and is asked again next time."""
        if self._fixed is not None:
            return self._fixed
        wire = self._wires.get(pool)
        if wire is None:
            wire = self._wires.setdefault(pool, _Wire())
        if wire.binary is not None:
            return wire.binary
        try:
            async with asyncio.timeout(deadline.check(f"the {WHAT} call")):
                async with wire.asking:
                    if wire.binary is None:
                        wire.binary = await self._ask(pool, deadline)
        except TimeoutError:  # waited for another call's ask past this call's deadline
            raise UpstreamTimeout(
                f"the {WHAT} backend did not answer within the deadline "
                f"({deadline.budget_s * 1000:.0f} ms)"
            ) from None
        # Still None: the server failed to answer (5xx); JSON this once, ask again next time.
        return bool(wire.binary)

    async def _ask(self, pool: HTTPPool, deadline: Deadline) -> bool | None:
        """The replica's ``GET /v2``: binary when its extensions list binary_tensor_data. A
        server without server metadata (a 4xx, not the documented shape) gets JSON, which every
        V2 server reads; a 5xx (a server starting, a proxy whose upstream is down) says nothing
        yet: None, asked again on the next call."""
        reply = await call(
            pool,
            "GET",
            "/v2",
            what=WHAT,
            deadline=Deadline(min(PROBE_TIMEOUT_S, deadline.remaining())),
            headers=self._auth,
        )
        if reply.status >= 500:
            return None
        server, extensions = "", []
        if reply.status == 200:
            try:
                doc = orjson.loads(reply.body)
                server = f"{doc.get('name', '')} {doc.get('version', '')}".strip()
                extensions = [str(e) for e in doc.get("extensions") or []]
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                pass
        binary = BINARY_EXTENSION in extensions
        log.info(
            "backend %s: replica %s:%s (%s) %s; sending %s",
            self.name,
            *pool.connect_to,
            server or f"GET /v2 answered HTTP {reply.status}",
            f"lists {BINARY_EXTENSION}" if binary else f"does not list {BINARY_EXTENSION}",
            "binary tensors" if binary else "JSON",
        )
        return binary

    def _forget(self, pool: HTTPPool) -> None:
        self._wires.pop(pool, None)

    # -- inference ------------------------------------------------------------------------

    def encode(self, request: InferenceRequest, binary: bool) -> tuple[bytes, dict[str, str]]:
        """The body and content headers of an infer call: JSON header + binary tensors (all
        outputs asked for in binary too), or plain V2 JSON."""
        return encode_v2_request(request, binary)

    async def infer_on(
        self, pool: HTTPPool, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        binary = await self._binary_on(pool, deadline)
        reply = await self._post(pool, request, deadline, binary)
        if binary and _unreadable_body(reply):
            if self._fixed is None:
                # Told binary_tensor_data, yet the body was unreadable: another server may
                # answer at this address now. Ask again; resend as JSON if it says so.
                self._forget(pool)
                binary = await self._binary_on(pool, deadline)
                if not binary:
                    reply = await self._post(pool, request, deadline, binary)
            if binary and _unreadable_body(reply):
                log.warning(
                    "backend %s: the server at %s:%s cannot read binary tensors (HTTP %s); "
                    "set binary_tensors: auto or false for it in models.yaml",
                    self.name,
                    *pool.connect_to,
                    reply.status,
                )
                raise UpstreamError(
                    f"the {WHAT} backend could not read the gateway's binary tensor request"
                )
        if reply.status != 200:
            raise self._status_error(reply.status, reply.body, request)
        answer_split = reply.headers.get(HEADER_LENGTH)
        return self._decode(reply.body, answer_split, request)

    async def _post(
        self, pool: HTTPPool, request: InferenceRequest, deadline: Deadline, binary: bool
    ) -> Reply:
        body, content = self.encode(request, binary)
        return await call(
            pool,
            "POST",
            self._path(request.model, request.version) + "/infer",
            what=WHAT,
            deadline=deadline,
            body=body,
            headers={**content, **self._auth},
            trace=request.trace,
        )

    def _status_error(self, status: int, raw: bytes, request: InferenceRequest) -> DuoServeError:
        what = f"model '{request.model}'" + (
            f" version '{request.version}'" if request.version else ""
        )
        return status_error(status, WHAT, what, error_text(raw))

    def _decode(
        self, raw: bytes, header_length: str | None, request: InferenceRequest
    ) -> InferenceResponse:
        try:
            return decode_v2_response(raw, header_length, request)
        except (KeyError, TypeError, ValueError, AttributeError, DuoServeError) as error:
            log.warning("backend %s: unexpected V2 answer: %r", self.name, error)
            raise UpstreamError(
                "the V2 server answered in a format the gateway does not understand"
            ) from None

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
        """Whether a replica may return to rotation: its own health (``GET /v2/health/ready``),
        and what it speaks asked on the probe's fresh pool, which then carries its calls."""
        try:
            if (await self._get(pool, "/v2/health/ready")).status != 200:
                return False
            await self._binary_on(pool, Deadline(PROBE_TIMEOUT_S))
        except DuoServeError:
            return False
        return True

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


def _unreadable_body(reply: Reply) -> bool:
    """Whether a server refused a binary tensor body without reading it as the Open Inference
    Protocol: a 415, or a 422 or 500 that is not in the V2 error shape. A server that reads the
    extension answers its failures as ``{"error": ...}`` (Triton, KServe, DuoServe); MLServer
    1.7 reads the body as one malformed JSON document and answers FastAPI's 422
    ``{"detail": ...}``, or a bare 500 "Internal Server Error" when the tensor bytes are not
    UTF-8 (its validation handler fails on them)."""
    if reply.status == 415:
        return True
    if reply.status not in (422, 500):
        return False
    try:
        doc = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return True
    return not (isinstance(doc, dict) and isinstance(doc.get("error"), str))


def _detail(raw: bytes) -> list[dict[str, Any]]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    detail = doc.get("detail") if isinstance(doc, dict) else None
    return [item for item in detail if isinstance(item, dict)] if isinstance(detail, list) else []


def error_text(raw: bytes) -> str:
    """A V2 server's error answer as one readable, sanitised line: the protocol's
    ``{"error": "..."}``, or a FastAPI validation answer ``{"detail": [{"loc", "msg"}, ...]}``
    (MLServer, KServe's Python servers) as ``inputs.0.datatype: <msg>; ...``. What the server
    echoes of the request (``input``) or links to (``url``) is left out."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(doc, dict):
        return ""
    if isinstance(doc.get("error"), str):
        return server_message(doc["error"])
    detail = doc.get("detail")
    if isinstance(detail, str):
        return server_message(detail)
    parts = []
    for item in _detail(raw):
        loc = [str(part) for part in item.get("loc") or []]
        if loc and loc[0] == "body":
            loc = loc[1:]
        message = server_message(str(item.get("msg", "")), limit=200)
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts)[:300]
