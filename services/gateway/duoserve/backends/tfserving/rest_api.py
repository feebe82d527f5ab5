"""TF Serving's REST API (port 8501) on one replica: ``POST .../{m}[...]:predict`` with the
columnar ``{"inputs": {...}}`` JSON, ``GET .../{m}[...]`` status and ``.../metadata``, on the
replica's pooled HTTP connections.

Naming outputs: TF Serving answers a signature with a single output with a bare value, no
name. The signature's output names and dtypes are learnt once per (model, version, signature)
from ``GET .../metadata`` and cached; a single requested output's name wins, and without
metadata the output declared in models.yaml names it.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from duoserve.backends.http import PROBE_TIMEOUT_S, HTTPPool, call
from duoserve.backends.tfserving.errors import describe, http_error
from duoserve.codecs.tfserving import (
    decode_metadata,
    is_b64,
    loads_answer,
    output_types,
    predict_body,
    signature_name,
    tensor_from_json,
)
from duoserve.config import TensorSpec
from duoserve.errors import BadRequest, DuoServeError, UpstreamError
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse

log = logging.getLogger("duoserve.backends.tfserving")


def rest_path(model: str, version: str | None) -> str:
    """``/v1/models/{m}``, with ``/versions/{v}`` for a numeric version, ``/labels/{l}`` else."""
    path = f"/v1/models/{quote(model, safe='')}"
    if version:
        kind = "versions" if version.isdigit() else "labels"
        path += f"/{kind}/{quote(version, safe='')}"
    return path


class RestAPI:
    """Predictions, status and metadata of backend ``name`` over REST, on the replica given.

    ``declared``: the outputs models.yaml declares per model (the backend's, shared), which
    name and type a lone output when the metadata cannot."""

    def __init__(self, name: str, declared: dict[str, list[TensorSpec]]) -> None:
        self.name = name
        self._declared = declared
        # (model, version, signature) -> {output name: V2 datatype or None}
        self._outputs: dict[tuple[str, str | None, str], dict[str, str | None] | None] = {}

    async def _get_json(self, pool: HTTPPool, target: str, what: str, timeout: float) -> Any:
        reply = await call(pool, "GET", target, what="TF Serving", deadline=Deadline(timeout))
        if reply.status != 200:
            raise http_error(self.name, reply.status, reply.body, what)
        return loads_answer(reply.body)

    # -- inference ------------------------------------------------------------------------

    async def infer(
        self, pool: HTTPPool, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        what = describe(request.model, request.version)
        signature = signature_name(request)
        body = predict_body(signature, request.inputs)
        target = rest_path(request.model, request.version) + ":predict"
        reply = await call(
            pool,
            "POST",
            target,
            what="TF Serving",
            deadline=deadline,
            body=body,
            headers={"Content-Type": "application/json"},
            trace=request.trace,
        )
        if reply.status != 200:
            raise http_error(self.name, reply.status, reply.body, what)
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
                meta = await self.metadata(
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

    async def ready(self, pool: HTTPPool, model: str, version: str | None) -> bool:
        """Whether the replica has any version of the model (or the one asked for) AVAILABLE."""
        try:
            doc = await self._get_json(
                pool, rest_path(model, version), describe(model, version), PROBE_TIMEOUT_S
            )
            return any(s.get("state") == "AVAILABLE" for s in doc["model_version_status"])
        except Exception:  # noqa: BLE001 - a probe reports False, it never raises
            return False

    async def metadata(
        self, pool: HTTPPool, model: str, version: str | None, timeout: float
    ) -> dict[str, Any]:
        doc = await self._get_json(
            pool, rest_path(model, version) + "/metadata", describe(model, version), timeout
        )
        try:
            return decode_metadata(doc)
        except (KeyError, TypeError, AttributeError):
            raise UpstreamError("TF Serving answered metadata in an unexpected format") from None
