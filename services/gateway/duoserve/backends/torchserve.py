"""TorchServe's inference API (port 8080) over a pooled keep-alive HTTP client.

Only ``/predictions/{model}[/{version}]`` and ``/ping`` are ever called: never the management
(8081) or metrics (8082) API. Token auth is on by default in TorchServe >= 0.11.1: the inference
key comes from TorchServe's ``key_file.json`` (or a file holding only the key) or from an
environment variable, and is never logged or echoed.

Wire contract with ``services/torchserve/handler.py``: the gateway posts
``{"inputs": [{"name", "shape", "datatype", "data"}]}`` and gets ``{"outputs": [...]}`` back,
the Open Inference Protocol's tensor shapes in JSON.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
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
    status_error,
)
from duoserve.codecs.torchserve import json_body
from duoserve.codecs.v2 import binary_headers, binary_request, decode_v2_response
from duoserve.config import TorchServeBackendConfig
from duoserve.errors import (
    DuoServeError,
    UpstreamError,
)
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse
from duoserve.tracing import CallSpan

log = logging.getLogger(__name__)


@lru_cache(maxsize=1024)
def _predictions_path(model: str, version: str | None) -> str:
    """TorchServe's inference path of a model (and version), each part percent-quoted."""
    path = f"/predictions/{quote(model, safe='')}"
    if version:
        path += f"/{quote(version, safe='')}"
    return path


def read_token(token_file: str | None, token_env: str | None) -> str | None:
    """The inference key: from TorchServe's key_file.json, a plain key file, or the env."""
    if token_env and os.environ.get(token_env):
        return os.environ[token_env].strip()
    if not token_file:
        return None
    text = Path(token_file).read_text(encoding="utf-8").strip()
    if text.startswith("{"):
        keys = json.loads(text)
        key = keys.get("inference", {}).get("key")
        if not isinstance(key, str):
            raise ValueError(f"{token_file} has no inference key")
        return key
    return text


def _message(raw: bytes) -> str:
    """TorchServe's error text, first line only, bounded (no internals beyond that)."""
    try:
        doc = orjson.loads(raw)
        text = str(doc.get("message") or doc.get("error") or "") if isinstance(doc, dict) else ""
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:300]


# What a handler that reads JSON only answers to a binary body: "request body is not UTF-8
# text; send JSON" or "... is not valid JSON (...); send JSON" (DuoServe's handler before it
# read the binary extension).
_JSON_ONLY_HANDLER = b"; send JSON"


class TorchServeBackend(ReplicatedBackend[HTTPPool]):
    """PyTorch models on TorchServe: one or several replicas (see backends/endpoints.py)."""

    kind = "torchserve"

    def __init__(
        self,
        name: str,
        config: TorchServeBackendConfig,
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
            what="TorchServe",
            probe=self._ping,
            metrics=metrics,
            resolver=resolver,
        )
        self.call_span = CallSpan.http(config.url, "/predictions/{model}")
        self._binary = config.binary_tensors
        self._token: str | None = None
        self._token_mtime = 0.0
        self._auth_header: dict[str, str] | None = None
        self._auth_checked_at = 0.0
        self.coalesce(config.coalesce)

    def _auth(self) -> dict[str, str]:
        # Re-read the key when TorchServe rewrote key_file.json (it does on every start); the
        # file is looked at no more than once a second, not on every request.
        now = time.monotonic()
        if self._auth_header is not None and now - self._auth_checked_at < 1.0:
            return self._auth_header
        self._auth_checked_at = now
        path = self.config.token_file
        if path:
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                mtime = -1.0
            if mtime != self._token_mtime:
                self._token_mtime = mtime
                try:
                    self._token = read_token(path, self.config.token_env)
                except (OSError, ValueError) as error:
                    log.warning("backend %s: cannot read its token file: %s", self.name, error)
                    self._token = None
        elif self._token is None:
            self._token = read_token(None, self.config.token_env)
        self._auth_header = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        return self._auth_header

    async def infer_on(
        self, pool: HTTPPool, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        path = _predictions_path(request.model, request.version)
        binary = self._binary and all(t.datatype != "BYTES" for t in request.inputs)
        reply = await self._post(pool, path, request, deadline, binary)
        if binary and reply.status == 400 and _JSON_ONLY_HANDLER in reply.body:
            # An archive built with a handler that reads JSON only (e.g. mid rolling upgrade):
            # it refused the bytes before running anything. JSON from now on for this backend.
            log.warning(
                "backend %s: TorchServe's handler reads JSON only; sending JSON from now on "
                "(rebuild the archive with services/torchserve/handler.py for binary tensors)",
                self.name,
            )
            self._binary = False
            reply = await self._post(pool, path, request, deadline, False)
        if reply.status != 200:
            raise self._status_error(reply.status, reply.body, request)
        return self._decode(reply.body, request)

    async def _post(
        self, pool: HTTPPool, path: str, request: InferenceRequest, deadline: Deadline, binary: bool
    ) -> Reply:
        if binary:
            body, header_length = binary_request(request.inputs)
            headers = {**binary_headers(header_length), **self._auth()}
        else:
            body = json_body(request)
            headers = {"Content-Type": "application/json", **self._auth()}
        return await call(
            pool,
            "POST",
            path,
            what="TorchServe",
            deadline=deadline,
            body=body,
            headers=headers,
            trace=request.trace,
        )

    def _status_error(self, status: int, raw: bytes, request: InferenceRequest) -> DuoServeError:
        message = _message(raw)
        if status in (400, 401, 403) and b"InvalidKeyException" in raw:
            # TorchServe answers a missing or stale key with 400; it is the gateway's fault.
            self._auth_header = None  # look at the key file again on the next call
            log.error("backend %s refused the gateway's token (HTTP %s)", self.name, status)
            return UpstreamError("the TorchServe backend refused the gateway's credentials")
        what = f"model '{request.model}'" + (
            f" version '{request.version}'" if request.version else ""
        )
        if status in (401, 403):
            log.error("backend %s refused the gateway's token (HTTP %s)", self.name, status)
            return UpstreamError("the TorchServe backend refused the gateway's credentials")
        if status == 507:
            return UpstreamError(f"TorchServe's worker for {what} failed (out of memory?)")
        # 503: no worker free and the job queue full, so not processed: safe to retry.
        # 404 is answered without TorchServe's text (it names the model store).
        return status_error(status, "TorchServe", what, message if status == 400 else "")

    def _decode(self, raw: bytes, request: InferenceRequest) -> InferenceResponse:
        try:
            response = decode_v2_response(raw, None, request)
        except (KeyError, TypeError, ValueError, AttributeError, DuoServeError) as error:
            log.warning("backend %s: unexpected TorchServe answer: %r", self.name, error)
            raise UpstreamError(
                "TorchServe answered in a format the gateway does not understand; "
                "is the model archived with services/torchserve/handler.py?"
            ) from None
        # The version the call asked for, whatever the handler's answer says.
        response.model_version = request.version
        return response

    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        """Whether a replica in rotation is Healthy."""
        return await self.endpoints.first(self._ping)

    async def _ping(self, pool: HTTPPool) -> bool:
        """/ping is Healthy only while every registered model has its minimum workers.
        (TorchServe 0.12 wants the inference key on /ping too.)"""
        try:
            reply = await call(
                pool,
                "GET",
                "/ping",
                what="TorchServe",
                deadline=Deadline(PROBE_TIMEOUT_S),
                headers=self._auth(),
            )
            if reply.status != 200:
                return False
            doc: Any = orjson.loads(reply.body)
            return isinstance(doc, dict) and doc.get("status") == "Healthy"
        except (orjson.JSONDecodeError, DuoServeError):
            return False
