"""The core every frontend calls: validate, route, guard, call the backend, shadow, compare.

Frontends decode their protocol into an InferenceRequest and hand it here with a CallContext;
they never touch backends, limits or metrics of backends themselves.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from duoserve.backends.base import Backend
from duoserve.config import GatewayConfig, ModelConfig, TensorSpec
from duoserve.errors import (
    BadRequest,
    DuoServeError,
    NotFound,
    Overloaded,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from duoserve.metrics import Metrics
from duoserve.resilience import (
    CircuitBreaker,
    ConcurrencyLimiter,
    Deadline,
    RetryBudget,
    backoff_s,
)
from duoserve.router import ModelRouter, Route
from duoserve.tensors import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

# Errors after which another route may be tried: the backend did not process the request.
NOT_PROCESSED = (Unavailable,)
# Errors that say a backend is unhealthy (they feed its circuit breaker).
BACKEND_FAULTS = (Unavailable, UpstreamTimeout, UpstreamError)


@dataclass(slots=True)
class CallContext:
    """What the frontend learned from the HTTP request besides the tensors."""

    protocol: str
    pin: str | None = None
    route_key: str | None = None
    timeout_ms: float | None = None


@dataclass(slots=True)
class Served:
    """An answer and who gave it."""

    response: InferenceResponse
    route: Route
    backend_s: float


@dataclass
class BackendGuard:
    """Per-backend resilience state."""

    limiter: ConcurrencyLimiter
    breaker: CircuitBreaker
    retries: int
    timeout_s: float


class DataPlane:
    """Serves the models of one GatewayConfig over a set of started backends."""

    def __init__(
        self,
        config: GatewayConfig,
        backends: dict[str, Backend],
        metrics: Metrics,
        rng: random.Random | None = None,
        *,
        circuit_failure_threshold: int = 5,
        circuit_reset_s: float = 2.0,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        """``circuit_failure_threshold`` / ``circuit_reset_s`` apply to every backend whose
        models.yaml entry does not set its own; ``retry_budget`` is shared by all backends."""
        self.config = config
        self.backends = backends
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.models = {
            name: ModelRouter(name, model, backends, self.rng)
            for name, model in config.models.items()
        }
        self.guards: dict[str, BackendGuard] = {}
        for name, backend_config in config.backends.items():
            self.guards[name] = BackendGuard(
                limiter=ConcurrencyLimiter(
                    f"backend '{name}'", backend_config.max_concurrency, backend_config.max_queue
                ),
                breaker=CircuitBreaker(
                    threshold=backend_config.circuit_failure_threshold or circuit_failure_threshold,
                    reset_s=(
                        backend_config.circuit_reset_ms / 1000
                        if backend_config.circuit_reset_ms
                        else circuit_reset_s
                    ),
                    on_change=self._circuit_callback(name),
                ),
                retries=backend_config.retries,
                timeout_s=backend_config.timeout_ms / 1000,
            )
            metrics.set_circuit(name, "closed")
        self.model_limiters = {
            name: ConcurrencyLimiter(
                f"model '{name}'", model.max_concurrency, model.max_concurrency
            )
            for name, model in config.models.items()
            if model.max_concurrency
        }
        # A request's deadline ceiling: the model's timeout_ms, else its slowest backend's.
        self._ceilings_s = {
            name: model.config.timeout_ms / 1000
            if model.config.timeout_ms
            else max(self.guards[r.backend_name].timeout_s for r in model.routes)
            for name, model in self.models.items()
        }
        self.retry_budget = retry_budget or RetryBudget()
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    def _circuit_callback(self, backend: str) -> Any:
        def changed(state: str) -> None:
            self.metrics.set_circuit(backend, state)
            log.warning("circuit of backend %s is now %s", backend, state)

        return changed

    # -- lookups -------------------------------------------------------------------------

    def model(self, name: str) -> ModelRouter:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"unknown model '{name}'; GET /v2/models lists the models") from None

    def deadline_for(self, model: ModelRouter, ctx: CallContext) -> Deadline:
        ceiling = self._ceilings_s[model.name]
        if ctx.timeout_ms is not None:
            if ctx.timeout_ms <= 0:
                raise BadRequest("timeout must be a positive number of milliseconds")
            return Deadline(min(ceiling, ctx.timeout_ms / 1000))
        return Deadline(ceiling)

    # -- validation ----------------------------------------------------------------------

    # -- inference -----------------------------------------------------------------------

    async def infer(self, model_name: str, request: InferenceRequest, ctx: CallContext) -> Served:
        """Validate, route, call (with failover), and start the shadow copy."""
        model = self.model(model_name)
        validate_request(model.name, model.config, request)
        plan = model.plan(ctx.pin, ctx.route_key)
        deadline = self.deadline_for(model, ctx)
        model_limiter = self.model_limiters.get(model_name)
        if model_limiter is not None:
            try:
                await model_limiter.acquire(deadline)
            except Overloaded:
                self.metrics.shed.labels(model_name, "model_concurrency").inc()
                raise
        try:
            served = await self._serve(model, plan, request, deadline)
        finally:
            if model_limiter is not None:
                model_limiter.release()
        if model.shadow is not None and self.rng.random() < model.config.shadow.sample:  # type: ignore[union-attr]
            self._start_shadow(model, request, served)
        return served

    async def _serve(
        self, model: ModelRouter, plan: list[Route], request: InferenceRequest, deadline: Deadline
    ) -> Served:
        last = len(plan) - 1
        for index, route in enumerate(plan):
            try:
                served = await self.call_route(model.name, route, request, deadline)
            except DuoServeError as error:
                error.route = route  # who failed, for the metrics' framework and backend labels
                if isinstance(error, NOT_PROCESSED) and index < last and not deadline.expired():
                    continue  # not processed: the next route may serve it
                raise
            if index > 0:
                self.metrics.failovers.labels(model.name, route.framework).inc()
            return served
        raise AssertionError("a plan has at least one route, and its last one returns or raises")

    async def call_route(
        self, model_name: str, route: Route, request: InferenceRequest, deadline: Deadline
    ) -> Served:
        """One route: circuit breaker, backend concurrency limit, retries of unprocessed calls."""
        guard = self.guards[route.backend_name]
        target = request.with_target(route.model, request.version or route.version, route.framework)
        labels = (route.backend_name, route.framework)
        backend = route.backend
        attempt = 0
        tried: list[str] = []  # replicas that did not process this request
        budget = self.retry_budget
        budget.active += 1
        try:
            while True:
                if not guard.breaker.allow():
                    self.metrics.backend_errors.labels(model_name, *labels, "circuit_open").inc()
                    raise Unavailable(
                        f"the {route.framework} backend for model '{model_name}' is failing; "
                        "its circuit is open",
                        reason="circuit_open",
                        retry_after_s=guard.breaker.retry_after_s(),
                    )
                try:
                    await guard.limiter.acquire(deadline)
                except Overloaded:
                    guard.breaker.record_neutral()
                    self.metrics.shed.labels(model_name, "backend_concurrency").inc()
                    raise
                in_flight = self.metrics.backend_in_flight.labels(*labels)
                in_flight.inc()
                started = time.perf_counter()
                try:
                    response = await backend.infer(target, deadline, avoid=tried)
                except BACKEND_FAULTS as error:
                    # One replica failing while others are healthy is the replica's problem
                    # (outlier ejection handles it), not the backend's: the circuit opens only
                    # when no replica is left that works.
                    elsewhere = backend.healthy_elsewhere(error.endpoint)
                    if elsewhere:
                        guard.breaker.record_neutral()
                    else:
                        guard.breaker.record_failure()
                    self.metrics.backend_errors.labels(model_name, *labels, error.reason).inc()
                    if (
                        isinstance(error, NOT_PROCESSED)
                        and attempt < guard.retries
                        and budget.can_retry()
                        and deadline.remaining() > 0.005
                    ):
                        if attempt == 0:
                            budget.retrying += 1  # until this request ends, retries included
                        attempt += 1
                        self.metrics.retries.labels(route.backend_name, error.reason).inc()
                        if error.endpoint is not None:
                            tried.append(error.endpoint)
                        if not elsewhere:  # the same replica(s) again: give them a moment
                            await asyncio.sleep(min(backoff_s(attempt), deadline.remaining() / 2))
                        continue
                    raise
                except DuoServeError:
                    guard.breaker.record_neutral()
                    raise
                except asyncio.CancelledError:
                    guard.breaker.record_neutral()
                    raise
                except Exception as error:  # a backend bug must not become a 500 with a trace
                    guard.breaker.record_failure()
                    self.metrics.backend_errors.labels(model_name, *labels, "backend_error").inc()
                    log.exception("backend %s failed unexpectedly", route.backend_name)
                    raise UpstreamError(
                        f"the {route.framework} backend failed while serving '{model_name}'"
                    ) from error
                finally:
                    elapsed = time.perf_counter() - started
                    in_flight.dec()
                    guard.limiter.release()
                guard.breaker.record_success()
                self.metrics.backend_duration.labels(
                    model_name, route.framework, route.backend_name
                ).observe(elapsed)
                return Served(response, route, elapsed)
        finally:
            budget.active -= 1
            if attempt:
                budget.retrying -= 1

    # -- shadow --------------------------------------------------------------------------

    def _start_shadow(self, model: ModelRouter, request: InferenceRequest, primary: Served) -> None:
        task = asyncio.get_running_loop().create_task(self._shadow(model, request, primary))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, model: ModelRouter, request: InferenceRequest, primary: Served) -> None:
        route = model.shadow
        assert route is not None
        deadline = Deadline(self.guards[route.backend_name].timeout_s)
        try:
            shadow = await self.call_route(model.name, route, request, deadline)
        except DuoServeError as error:
            self.metrics.shadow_requests.labels(
                model.name, route.framework, str(error.status)
            ).inc()
            return
        except Exception:  # noqa: BLE001 - a shadow must never take the gateway down
            log.exception("shadow call of model %s failed", model.name)
            self.metrics.shadow_requests.labels(model.name, route.framework, "500").inc()
            return
        self.metrics.shadow_requests.labels(model.name, route.framework, "200").inc()
        agreement = compare_outputs(primary.response, shadow.response)
        self.metrics.shadow_compared_items.labels(model.name, route.framework).inc(
            agreement["rows"]
        )
        self.metrics.shadow_disagreeing_items.labels(model.name, route.framework).inc(
            agreement["rows"] - agreement["argmax_agree"]
        )
        if agreement["argmax_agree"] < agreement["rows"]:
            self.metrics.shadow_disagreements.labels(model.name, route.framework).inc()
        if agreement["max_abs_diff"] is not None:
            self.metrics.shadow_max_abs_diff.labels(model.name, route.framework).observe(
                agreement["max_abs_diff"]
            )

    async def wait_shadows(self, timeout_s: float = 10.0) -> None:
        """Let running shadow calls finish (tests, shutdown), for at most ``timeout_s``."""
        if self._shadow_tasks:
            _, pending = await asyncio.wait(list(self._shadow_tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()

    # -- compare -------------------------------------------------------------------------

    async def compare(
        self, model_name: str, request: InferenceRequest, ctx: CallContext
    ) -> dict[str, Any]:
        """Run one request on every route of the model; each answer, its latency, agreement."""
        model = self.model(model_name)
        validate_request(model.name, model.config, request)
        deadline = self.deadline_for(model, ctx)

        async def one(route: Route) -> Served | DuoServeError:
            try:
                return await self.call_route(model_name, route, request, deadline)
            except DuoServeError as error:
                return error

        outcomes = await asyncio.gather(*(one(route) for route in model.routes))
        results: list[dict[str, Any]] = []
        answered: list[Served] = []
        for route, outcome in zip(model.routes, outcomes, strict=True):
            entry: dict[str, Any] = {"framework": route.framework, "backend": route.backend_name}
            if isinstance(outcome, Served):
                answered.append(outcome)
                entry["model_version"] = outcome.response.model_version
                entry["latency_ms"] = round(outcome.backend_s * 1000, 3)
                entry["response"] = outcome.response
            else:
                entry["error"] = outcome.message
                entry["status"] = outcome.status
            results.append(entry)
        pairs = []
        for i in range(len(answered)):
            for j in range(i + 1, len(answered)):
                a, b = answered[i], answered[j]
                pairs.append(
                    {
                        "a": {"framework": a.route.framework, "backend": a.route.backend_name},
                        "b": {"framework": b.route.framework, "backend": b.route.backend_name},
                        **compare_outputs(a.response, b.response),
                    }
                )
        return {"model_name": model_name, "results": results, "agreement": pairs}

    # -- health --------------------------------------------------------------------------

    async def model_ready(self, model_name: str, version: str | None = None) -> bool:
        model = self.model(model_name)
        checks = [
            route.backend.ready(route.model, version or route.version, framework=route.framework)
            for route in model.routes
            if self.guards[route.backend_name].breaker.state != "open"
        ]
        if not checks:
            return False
        results = await asyncio.gather(*checks)
        return any(results) if model.config.failover else all(results)

    async def readiness(self) -> tuple[bool, dict[str, bool]]:
        """(whether this replica is ready, whether each model is servable now).

        A replica is unready only for what is its own: an in-process (embedded) model that is
        not loaded. Remote backends are shared by every replica; their outage is reported per
        model (and by duoserve_backend_up) but does not pull every replica out of the load
        balancer at once, which would also take down the models that still work or fail over.
        Draining is answered by the drain middleware before this is asked."""
        names = list(self.models)
        answers = await asyncio.gather(*(self.model_ready(n) for n in names))
        servable = dict(zip(names, answers, strict=True))
        local = [
            route
            for model in self.models.values()
            for route in model.routes
            if route.backend.kind == "embedded"
        ]
        own = await asyncio.gather(
            *(
                route.backend.ready(route.model, route.version, framework=route.framework)
                for route in local
            )
        )
        return all(own), servable

    async def ready(self) -> bool:
        return (await self.readiness())[0]

    def circuit_states(self) -> dict[str, str]:
        return {name: guard.breaker.state for name, guard in self.guards.items()}


# -- signature and comparison helpers -------------------------------------------------------


def _fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    if len(shape) != len(spec.shape):
        return False
    return all(want == -1 or want == got for want, got in zip(spec.shape, shape, strict=True))


def validate_request(model_name: str, config: ModelConfig, request: InferenceRequest) -> None:
    """BadRequest unless the inputs are exactly the model's declared inputs, each fitting its
    datatype and shape, and the requested outputs exist."""
    specs = config.input_specs
    seen: set[str] = set()
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise BadRequest(
                f"model '{model_name}' has no input '{tensor.name}'; "
                f"its inputs are: {', '.join(specs)}"
            )
        if tensor.name in seen:
            raise BadRequest(f"input '{tensor.name}' is given twice")
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            raise BadRequest(
                f"input '{tensor.name}' must be {spec.datatype}, not {tensor.datatype}"
            )
        shape = tuple(tensor.data.shape)
        if not _fits(shape, spec):
            raise BadRequest(
                f"input '{tensor.name}' has shape {list(shape)}; model '{model_name}' "
                f"expects {spec.shape} (-1 = any size)"
            )
        if shape and spec.shape[0] == -1 and shape[0] == 0:
            raise BadRequest(f"input '{tensor.name}' has no rows; send at least one")
        if shape and spec.shape[0] == -1 and shape[0] > config.max_batch:
            raise BadRequest(
                f"input '{tensor.name}' has {shape[0]} rows; model '{model_name}' takes "
                f"at most {config.max_batch} per request"
            )
    missing = [name for name in specs if name not in seen]
    if missing:
        raise BadRequest(f"model '{model_name}' needs input(s): {', '.join(missing)}")
    if request.outputs:
        known = config.output_names
        for output in request.outputs:
            if output.name not in known:
                raise BadRequest(
                    f"model '{model_name}' has no output '{output.name}'; "
                    f"its outputs are: {', '.join(sorted(known))}"
                )


def compare_outputs(a: InferenceResponse, b: InferenceResponse) -> dict[str, Any]:
    """Agreement of two answers: rows whose argmax (last axis) matches, max absolute difference.

    Both are computed over the outputs the two answers share, with numeric data."""
    rows = 0
    agree = 0
    max_diff: float | None = None
    for tensor in a.outputs:
        other = b.output(tensor.name)
        if other is None or tensor.data.dtype.kind not in "biuf":
            continue
        x = np.asarray(tensor.data, dtype=np.float64)
        y = np.asarray(other.data, dtype=np.float64)
        if x.shape != y.shape:
            continue
        if x.size:
            diff = float(np.max(np.abs(x - y)))
            max_diff = diff if max_diff is None else max(max_diff, diff)
        if x.ndim >= 1 and x.size:
            arg_x = np.argmax(x.reshape(-1, x.shape[-1]), axis=-1)
            arg_y = np.argmax(y.reshape(-1, y.shape[-1]), axis=-1)
            rows += int(arg_x.size)
            agree += int(np.sum(arg_x == arg_y))
    return {
        "rows": rows,
        "argmax_agree": agree,
        "argmax_agreement": (agree / rows) if rows else None,
        "max_abs_diff": max_diff,
    }
