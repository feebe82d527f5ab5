"""The models.yaml schema: backends, models, their routes. Validated once, at start.

A bad file fails fast with the dotted path of every offending key, e.g.
``models.digits.routes.0.backend: no backend named 'torchsrve' (known: local, tfserving)``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from duoserve.tensors import V2_TO_NUMPY

Framework = Literal["pytorch", "tensorflow"]
FRAMEWORKS: tuple[str, ...] = ("pytorch", "tensorflow")


class ConfigError(Exception):
    """models.yaml is missing, unreadable or invalid; the message names each bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _BackendBase(_Strict):
    timeout_ms: int = Field(2000, gt=0, le=600_000)
    """Default deadline of one call to this backend (a model's timeout_ms overrides it)."""
    max_concurrency: int = Field(64, gt=0, le=100_000)
    """Calls in flight to this backend at once; more wait in a bounded queue, then are shed."""
    max_queue: int = Field(64, ge=0, le=100_000)
    """Calls allowed to wait for a concurrency slot before new ones get 503."""
    retries: int = Field(1, ge=0, le=5)
    """Retries of a call that the backend did not process (refused connection, queue full)."""
    circuit_failure_threshold: int | None = Field(None, ge=1, le=1000)
    """Consecutive failures that open this backend's circuit (default: the gateway setting)."""
    circuit_reset_ms: int | None = Field(None, gt=0, le=600_000)
    """How long an open circuit waits before one probe call (default: the gateway setting)."""


_HOST_PORT = r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}$"


class OutlierConfig(_Strict):
    """When one replica of a backend is failing, take it out of rotation (outlier ejection)."""

    consecutive_failures: int = Field(5, ge=1, le=1000)
    """Failed calls in a row (refused or dropped connections, 5xx, timeouts) that eject a
    replica. Client errors (4xx) and answers 'at capacity' never count."""
    base_ejection_s: float = Field(1.0, gt=0, le=3600)
    """An ejected replica stays out this long times the number of times it was ejected
    (capped by max_ejection_s), then returns once a health probe passes; probes repeat every
    base_ejection_s while it fails them."""
    max_ejection_s: float = Field(30.0, gt=0, le=86_400)
    """Longest ejection; a replica healthy for this long starts counting ejections anew."""
    max_ejected_percent: int = Field(50, ge=0, le=100)
    """Never more than this share of the replicas out at once (so with one or two replicas at
    most one is ever ejected, and a lone replica never is: the circuit breaker covers it)."""

    @model_validator(mode="after")
    def _max_covers_base(self) -> OutlierConfig:
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError("max_ejection_s must be at least base_ejection_s")
        return self


class CoalesceConfig(_Strict):
    """Adaptive coalescing: requests that arrive while the backend is busy with the same model
    and version go to it together, as one call (rows concatenated along the first dimension)."""

    max_batch_size: int = Field(8, ge=1, le=4096)
    """Most rows in one combined call (a single request with more rows still goes alone)."""
    max_delay_ms: float = Field(0.0, ge=0, le=1000)
    """How long a call may wait for more requests to join once it could go out (a call slot
    is free) while it holds fewer than max_batch_size rows; 0: at once, so requests are
    combined only while max_calls_in_flight calls are already out."""
    max_calls_in_flight: int = Field(2, ge=1, le=10_000)
    """Combined calls out at once per model and version, per replica in rotation; requests
    beyond them queue and go out together when one returns."""


class RemoteBackendConfig(_BackendBase):
    """A server reached over the network, possibly as several replicas (endpoints)."""

    endpoints: list[Annotated[str, Field(pattern=_HOST_PORT)]] | None = Field(
        None, min_length=1, max_length=1024
    )
    """The replicas as ``host:port`` entries, instead of the host and port of the address
    (``url``, or ``grpc`` for TF Serving over gRPC). Names are resolved like the address."""
    resolve_interval_s: float = Field(5.0, gt=0, le=3600)
    """How often host names are resolved again: every address a name resolves to is a replica
    (a Kubernetes headless Service lists each Ready pod), so replicas that join are used and
    replicas that leave are drained within this interval. IP addresses are never resolved."""
    slow_start_s: float = Field(10.0, ge=0, le=3600)
    """A replica that joins (or returns from ejection) gets a share of traffic that grows from
    a tenth to a full share over this long; 0 turns slow start off."""
    outlier: OutlierConfig = OutlierConfig.model_validate({})  # frozen: one default for all
    """Ejection of failing replicas."""
    coalesce: CoalesceConfig | None = None
    """Combine concurrent requests into one backend call (off when absent). Only for models
    whose server takes a batch of rows per call and answers row for row."""

    @field_validator("endpoints")
    @classmethod
    def _ports_in_range(cls, value: list[str] | None) -> list[str] | None:
        for entry in value or []:
            port = int(entry.rsplit(":", 1)[1])
            if not 0 < port < 65536:
                raise ValueError(f"'{entry}': the port must be between 1 and 65535")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("an endpoint is listed twice")
        return value


class TorchServeBackendConfig(RemoteBackendConfig):
    kind: Literal["torchserve"]
    url: str = Field(pattern=r"^https?://")
    """Base URL of TorchServe's inference API (port 8080), never the management API."""
    token_file: str | None = None
    """TorchServe's key_file.json (or a file holding just the inference key)."""
    token_env: str | None = None
    """Name of an environment variable holding the inference key."""
    metrics_url: str | None = None
    """Optional TorchServe metrics endpoint, used only for readiness probing."""
    binary_tensors: bool = True
    """Send input tensors with the binary tensor extension (raw bytes after a JSON header)
    instead of JSON lists. Needs services/torchserve/handler.py as built now; false for an
    archive whose handler reads JSON only."""


class TFServingBackendConfig(RemoteBackendConfig):
    kind: Literal["tfserving"]
    protocol: Literal["grpc", "rest"] = "grpc"
    """Which TF Serving API predictions, status and metadata use; each replica is called on it."""
    grpc: str | None = Field(None, pattern=r"^[^/\s]+:\d+$")
    """host:port of TF Serving's gRPC API (8500)."""
    url: str | None = Field(None, pattern=r"^https?://")
    """Base URL of TF Serving's REST API (8501), for protocol rest."""

    @model_validator(mode="after")
    def _needs_address(self) -> TFServingBackendConfig:
        if self.protocol == "grpc" and not (self.grpc or self.endpoints):
            raise ValueError("protocol 'grpc' needs 'grpc: host:port' (or 'endpoints')")
        if self.protocol == "rest" and not self.url:
            raise ValueError("protocol 'rest' needs 'url: http://host:port'")
        return self


class V2BackendConfig(RemoteBackendConfig):
    kind: Literal["v2"]
    url: str = Field(pattern=r"^https?://")
    """Base URL of an Open Inference Protocol server (Triton, MLServer, KServe)."""
    token_env: str | None = None
    """Optional environment variable holding a bearer token for that server."""
    binary_tensors: Literal["auto", True, False] = "auto"
    """How tensors travel to and from the server. auto: with the binary tensor extension
    (raw bytes after a JSON header, both ways) on each replica whose ``GET /v2`` lists
    ``binary_tensor_data`` (Triton, KServe), as V2 JSON on the others (MLServer); asked when the
    gateway starts and whenever a replica joins or returns. true: always binary (no ``GET /v2``);
    false: always JSON (no ``GET /v2``)."""


class EmbeddedBackendConfig(_BackendBase):
    kind: Literal["embedded"]
    model_store: str = "models/store"
    """Folder with pytorch/<model>/<version>/model.pt and tensorflow/<model>/<version>/ SavedModels;
    relative paths are taken from the folder of models.yaml."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when the framework sees a GPU, CPU otherwise."""
    max_batch_size: int = Field(1, ge=1, le=4096)
    """Adaptive micro-batching: largest batch of queued requests run together (1 = off)."""
    max_batch_delay_ms: float = Field(2.0, ge=0, le=1000)
    """Longest wait for a batch to fill."""


BackendConfig = Annotated[
    TorchServeBackendConfig | TFServingBackendConfig | V2BackendConfig | EmbeddedBackendConfig,
    Field(discriminator="kind"),
]


class TensorSpec(_Strict):
    name: str = Field(min_length=1, max_length=128)
    datatype: str
    shape: list[int] = Field(min_length=0, max_length=16)
    """Dimensions; -1 is variable."""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in V2_TO_NUMPY:
            raise ValueError(f"unknown datatype '{value}'; use one of {', '.join(V2_TO_NUMPY)}")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in value):
            raise ValueError("dimensions are positive, or -1 for variable")
        return value

    def max_elements(self, max_batch: int) -> int:
        """Elements of the largest tensor this spec admits, variable dims taken as max_batch."""
        return math.prod(max_batch if d == -1 else d for d in self.shape)


class RouteConfig(_Strict):
    backend: str
    """Name of a backend in `backends`."""
    framework: Framework
    model: str | None = None
    """The model's name on that backend (defaults to the logical model's name)."""
    version: str | None = None
    """Version on the backend; none means the backend's default/latest."""
    weight: float = Field(1.0, ge=0)
    """Share of traffic, relative to the other routes' weights."""


class ShadowConfig(RouteConfig):
    sample: float = Field(1.0, gt=0, le=1)
    """Share of primary requests copied to the shadow."""
    weight: float = 0.0


# Frameworks each backend kind can serve: a rollout target on a backend that cannot run its
# framework is a config error, not a stream of 502s.
KIND_FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "torchserve": ("pytorch",),
    "tfserving": ("tensorflow",),
    "v2": FRAMEWORKS,
    "embedded": FRAMEWORKS,
}


class RolloutShadowConfig(_Strict):
    sample: float = Field(0.2, gt=0, le=1)
    """Share of the model's requests copied to the target, in the shadow phase and all along
    the steps (so agreement is measured until the target serves everyone)."""
    min_requests: int = Field(500, ge=1, le=100_000_000)
    """Copies the target must have answered before the first step may start."""


class GatesConfig(_Strict):
    """What the target must show, in each phase, before the rollout moves on. Any gate that
    fails rolls the rollout back."""

    min_requests: int = Field(200, ge=1, le=100_000_000)
    """Target calls per step (user requests and copies) before a step may pass."""
    max_error_ratio: float = Field(0.01, ge=0, le=1)
    """Target calls that ended in a 5xx or a timeout, as a share of its calls."""
    max_p99_ratio: float = Field(1.25, gt=0, le=1000)
    """Target p99 latency over the current routes' p99 (backend call time)."""
    min_agreement: float = Field(0.995, ge=0, le=1)
    """Rows on which target and current routes agree (same argmax), of the rows compared."""
    max_abs_diff: float = Field(0.001, ge=0)
    """Largest absolute difference allowed between target and current outputs; any compared
    request beyond it fails the gate."""


class GatesFromConfig(_Strict):
    prometheus: str = Field(pattern=r"^https?://")
    """Prometheus base URL: every replica reads the fleet's numbers there and so takes the
    same decisions."""
    settle_s: float = Field(3.0, ge=0, le=300)
    """How long after each evaluation time the gateway waits before asking, so every replica's
    scrape of that moment has landed."""


class RolloutConfig(_Strict):
    """Move a model from its routes to ``to``, in steps gated on the target's answers."""

    to: RouteConfig
    """The target route (its weight is ignored: the steps set it)."""
    start: str
    """RFC 3339 time (e.g. 2026-12-01T10:00:00Z): phases are counted from here, so every
    replica agrees on them."""
    shadow: RolloutShadowConfig = RolloutShadowConfig.model_validate({})
    steps: list[float] = Field(default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0])
    """Percent of the model's requests sent to the target, one step after another."""
    step_interval_s: float = Field(300.0, ge=1, le=30 * 86_400)
    """Shortest time in the shadow phase and in each step."""
    evaluate_interval_s: float = Field(10.0, ge=0.1, le=3600)
    """How often the gates are checked within a phase (a failing target is rolled back within
    this long)."""
    gates: GatesConfig = GatesConfig.model_validate({})
    gates_from: GatesFromConfig | None = None
    """Where gate values come from: a Prometheus (every replica decides alike), or, without
    it, this replica's own counters (one replica, or `make run`)."""

    @field_validator("start")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        parse_start(value)
        return value

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one step (percent of traffic to the target)")
        if any(not 0 < step <= 100 for step in value):
            raise ValueError("each step is a percent above 0 and at most 100")
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("steps must increase")
        return value

    @cached_property
    def start_time(self) -> float:
        """``start`` as a Unix time."""
        return parse_start(self.start)


def parse_start(text: str) -> float:
    """An RFC 3339 date-time with its offset (``Z`` or ``+hh:mm``) as a Unix time."""
    pattern = r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
    if not re.fullmatch(pattern, text):
        raise ValueError(
            f"'{text}' is not an RFC 3339 time with an offset, e.g. 2026-12-01T10:00:00Z"
        )
    try:
        return datetime.fromisoformat(text.replace("z", "Z")).timestamp()
    except ValueError as error:
        raise ValueError(f"'{text}' is not a valid time: {error}") from None


class ModelConfig(_Strict):
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    shadow: ShadowConfig | None = None
    failover: bool = False
    """When a route's backend is down or its circuit open, try the model's other routes."""
    timeout_ms: int | None = Field(None, gt=0, le=600_000)
    """Deadline of a request to this model; clients may lower it, never raise it."""
    max_concurrency: int | None = Field(None, gt=0)
    """Requests to this model in flight at once (all routes together)."""
    max_batch: int = Field(1024, ge=1, le=1_000_000)
    """Largest first dimension a request may have; bounds JSON parsing before any tensor exists."""
    platform: str | None = None
    """Free text reported in V2 model metadata; defaults to the frameworks served."""
    version: str = Field("1", pattern=r"^\d+$")
    """The version number clients see in metadata and TF Serving status answers."""
    rollout: RolloutConfig | None = None
    """A gated move of this model's traffic to another route (see RolloutConfig)."""
    version_labels: dict[str, str] = Field(default_factory=dict)
    """TF Serving version labels (e.g. stable: "1") resolved at the gateway; a label not listed
    here is passed on as a label (only TF Serving backends know labels)."""

    @cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        """Inputs by name, built once (every request looks them up)."""
        return {spec.name: spec for spec in self.inputs}

    @cached_property
    def output_names(self) -> frozenset[str]:
        return frozenset(spec.name for spec in self.outputs)

    @model_validator(mode="after")
    def _routes_make_sense(self) -> ModelConfig:
        if sum(r.weight for r in self.routes) <= 0:
            raise ValueError("routes: at least one route needs a weight above 0")
        seen: set[str] = set()
        for spec in self.inputs:
            if spec.name in seen:
                raise ValueError(f"inputs: '{spec.name}' is declared twice")
            seen.add(spec.name)
        if self.rollout is not None:
            if self.shadow is not None:
                raise ValueError(
                    "rollout: a model in a rollout shadows to its target; remove 'shadow'"
                )
            to = self.rollout.to
            for route in self.routes:
                if (route.backend, route.framework) == (to.backend, to.framework):
                    raise ValueError(
                        "rollout.to: the target must differ from every route in backend or "
                        f"framework ('{to.backend}' {to.framework} is a route already)"
                    )
        return self


class GatewayConfig(_Strict):
    backends: dict[str, BackendConfig] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _routes_name_backends(self) -> GatewayConfig:
        known = ", ".join(sorted(self.backends))
        problems = []
        for model_name, model in self.models.items():
            targets: list[tuple[str, RouteConfig]] = [
                (f"models.{model_name}.routes.{i}", r) for i, r in enumerate(model.routes)
            ]
            if model.shadow is not None:
                targets.append((f"models.{model_name}.shadow", model.shadow))
            if model.rollout is not None:
                targets.append((f"models.{model_name}.rollout.to", model.rollout.to))
            for where, route in targets:
                if route.backend not in self.backends:
                    problems.append(
                        f"{where}.backend: no backend named '{route.backend}' (known: {known})"
                    )
            if model.rollout is not None and model.rollout.to.backend in self.backends:
                to = model.rollout.to
                kind = self.backends[to.backend].kind
                if to.framework not in KIND_FRAMEWORKS[kind]:
                    problems.append(
                        f"models.{model_name}.rollout.to.framework: backend '{to.backend}' "
                        f"({kind}) serves {' and '.join(KIND_FRAMEWORKS[kind])} models, "
                        f"not {to.framework}"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _format_errors(error: ValidationError) -> str:
    kinds = {"torchserve", "tfserving", "v2", "embedded"}
    lines = []
    for item in error.errors():
        loc = list(item["loc"])
        # pydantic puts the union's tag (the backend kind) in the path; the file has no such key.
        if len(loc) > 2 and loc[0] == "backends" and loc[2] in kinds:
            del loc[2]
        where = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "models.yaml") -> GatewayConfig:
    """Validate already-parsed YAML; ConfigError lists every offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with backends and models")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source} is invalid:\n{_format_errors(error)}") from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate models.yaml."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_config(data, str(path))
