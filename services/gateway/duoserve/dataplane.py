"""The core every frontend calls: validate, route, guard, call the backend, shadow, compare.

Frontends decode their protocol into an InferenceRequest and hand it here with a CallContext;
they never touch backends, limits or metrics of backends themselves.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from duoserve.backends.base import Backend
from duoserve.config import BackendConfig, GatewayConfig, ModelConfig, TensorSpec
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
    BackendGuard,
    CircuitBreaker,
    ConcurrencyLimiter,
    Deadline,
    RetryBudget,
    backoff_s,
)
from duoserve.rollout import Rollout, rollout_id
from duoserve.router import ModelRouter, Route
from duoserve.tensors import InferenceRequest, InferenceResponse

if TYPE_CHECKING:
    from duoserve.tracing import RequestTrace

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
    trace: RequestTrace | None = None
    """The request's trace (duoserve.tracing): None when tracing is off and the caller sent
    no trace context."""


@dataclass(slots=True)
class Served:
    """An answer and who gave it."""

    response: InferenceResponse
    route: Route
    backend_s: float


@dataclass(frozen=True)
class Plane:
    """Everything one models.yaml builds: what a request finds when it starts, and keeps to
    its end even if a reload replaces it meanwhile (routes carry their backend and guard)."""

    config: GatewayConfig
    backends: dict[str, Backend]
    guards: dict[str, BackendGuard]
    models: dict[str, ModelRouter]
    model_limiters: dict[str, ConcurrencyLimiter]
    ceilings_s: dict[str, float]
    """A request's deadline ceiling per model: its timeout_ms, else its slowest backend's."""


class DataPlane:
    """Serves the models of one GatewayConfig over a set of started backends; ``reload``
    swaps in another configuration while requests keep flowing."""

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
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.circuit_failure_threshold = circuit_failure_threshold
        self.circuit_reset_s = circuit_reset_s
        self.retry_budget = retry_budget or RetryBudget()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._draining: set[asyncio.Task[None]] = set()
        self.plane = self._plane(config, backends, {}, {})

    # The current plane's parts, for callers that need no snapshot of their own.
    @property
    def config(self) -> GatewayConfig:
        return self.plane.config

    @property
    def backends(self) -> dict[str, Backend]:
        return self.plane.backends

    @property
    def models(self) -> dict[str, ModelRouter]:
        return self.plane.models

    @property
    def guards(self) -> dict[str, BackendGuard]:
        return self.plane.guards

    @property
    def model_limiters(self) -> dict[str, ConcurrencyLimiter]:
        return self.plane.model_limiters

    def _guard(self, name: str, config: BackendConfig) -> BackendGuard:
        guard = BackendGuard(
            limiter=ConcurrencyLimiter(
                f"backend '{name}'", config.max_concurrency, config.max_queue
            ),
            breaker=CircuitBreaker(
                threshold=config.circuit_failure_threshold or self.circuit_failure_threshold,
                reset_s=(
                    config.circuit_reset_ms / 1000
                    if config.circuit_reset_ms
                    else self.circuit_reset_s
                ),
                on_change=self._circuit_callback(name),
            ),
            retries=config.retries,
            timeout_s=config.timeout_ms / 1000,
        )
        self.metrics.set_circuit(name, "closed")
        return guard

    def _plane(
        self,
        config: GatewayConfig,
        backends: dict[str, Backend],
        kept_guards: dict[str, BackendGuard],
        kept_rollouts: dict[str, Rollout],
    ) -> Plane:
        """A plane for ``config`` over ``backends``; guards (limiter, circuit) and rollouts
        given in ``kept_*`` carry over unchanged."""
        guards = {
            name: kept_guards.get(name) or self._guard(name, backend_config)
            for name, backend_config in config.backends.items()
        }
        models = {
            name: ModelRouter(name, model, backends, self.rng, guards)
            for name, model in config.models.items()
        }
        for name, model in models.items():
            rollout = config.models[name].rollout
            if rollout is not None:
                kept = kept_rollouts.get(name)
                model.rollout = kept if kept is not None else Rollout(name, rollout, self.metrics)
        limiters = {
            name: ConcurrencyLimiter(
                f"model '{name}'", model.max_concurrency, model.max_concurrency
            )
            for name, model in config.models.items()
            if model.max_concurrency
        }
        ceilings = {
            name: model.config.timeout_ms / 1000
            if model.config.timeout_ms
            else max(guards[r.backend_name].timeout_s for r in model.routes)
            for name, model in models.items()
        }
        return Plane(config, backends, guards, models, limiters, ceilings)

    async def reload(
        self,
        config: GatewayConfig,
        build: Callable[[GatewayConfig, set[str]], dict[str, Backend]],
        drain_s: float = 30.0,
    ) -> dict[str, list[str]]:
        """Serve ``config`` from now on. Backends whose entry is unchanged stay, with their
        connections, limiter and circuit; new or changed ones are built (``build(config,
        names)``) and started first (a failure leaves the old configuration serving); the old
        ones finish what they have in flight (up to ``drain_s``), then close. Requests in
        flight finish on the configuration they started with. Rollouts whose block is
        unchanged carry on where they were."""
        old = self.plane
        wanted, had = route_targets(config), route_targets(old.config)
        kept = {
            name: old.backends[name]
            for name, backend_config in config.backends.items()
            if name in old.backends
            and old.config.backends[name] == backend_config
            and (backend_config.kind != "embedded" or wanted.get(name) == had.get(name))
        }
        fresh = build(config, set(config.backends) - set(kept))
        try:
            await asyncio.gather(*(backend.start() for backend in fresh.values()))
        except Exception as error:
            await asyncio.gather(*(b.close() for b in fresh.values()), return_exceptions=True)
            raise ReloadError(
                f"a backend of the new configuration failed to start: {error}"
            ) from error
        register_routes(config, kept)
        rollouts = {
            name: model.rollout
            for name, model in old.models.items()
            if model.rollout is not None
            and name in config.models
            and config.models[name].rollout is not None
            and rollout_id(config.models[name].rollout) == model.rollout.id  # type: ignore[arg-type]
        }
        self.plane = self._plane(
            config, {**kept, **fresh}, {n: old.guards[n] for n in kept}, rollouts
        )
        for model in old.models.values():
            if model.rollout is not None and model.rollout not in rollouts.values():
                model.rollout.forget()
                self._spawn(model.rollout.close())
        gone = {name: backend for name, backend in old.backends.items() if name not in kept}
        for name, backend in gone.items():
            if name not in config.backends:
                self.metrics.forget_backend(name)
            self._spawn(self._drain_backend(backend, old.guards[name], drain_s))
        return {
            "kept": sorted(kept),
            "started": sorted(fresh),
            "closing": sorted(gone),
        }

    async def _drain_backend(self, backend: Backend, guard: BackendGuard, drain_s: float) -> None:
        """Close a backend the configuration dropped once its calls in flight are done."""
        deadline = time.monotonic() + drain_s
        while (guard.limiter.active or guard.limiter.queued) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if guard.limiter.active:
            log.warning(
                "backend %s left the configuration with %d calls still in flight after %.0f s; "
                "closing it",
                backend.name,
                guard.limiter.active,
                drain_s,
            )
        await backend.close()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(_logged(work))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def wait_drained(self, timeout_s: float = 30.0) -> None:
        """Let backends dropped by reloads close (tests, shutdown)."""
        if self._draining:
            await asyncio.wait(list(self._draining), timeout=timeout_s)

    async def run_rollouts(self, interval_s: float = 0.1) -> None:
        """Take every rollout's decisions as they fall due (runs for the app's lifetime)."""
        while True:
            for model in self.models.values():
                if model.rollout is not None:
                    try:
                        await model.rollout.tick()
                    except Exception:  # noqa: BLE001 - one rollout must not stop the others
                        log.exception("rollout of %s failed to evaluate", model.name)
            await asyncio.sleep(interval_s)

    async def close_rollouts(self) -> None:
        for model in self.models.values():
            if model.rollout is not None:
                await model.rollout.close()

    def rollout(self, model_name: str) -> Rollout:
        rollout = self.model(model_name).rollout
        if rollout is None:
            raise NotFound(f"model '{model_name}' has no rollout in models.yaml")
        return rollout

    def _circuit_callback(self, backend: str) -> Any:
        def changed(state: str) -> None:
            self.metrics.set_circuit(backend, state)
            log.warning("circuit of backend %s is now %s", backend, state)

        return changed

    # -- lookups -------------------------------------------------------------------------

    def model(self, name: str, plane: Plane | None = None) -> ModelRouter:
        try:
            return (plane or self.plane).models[name]
        except KeyError:
            raise NotFound(f"unknown model '{name}'; GET /v2/models lists the models") from None

    def deadline_for(
        self, model: ModelRouter, ctx: CallContext, plane: Plane | None = None
    ) -> Deadline:
        ceiling = (plane or self.plane).ceilings_s[model.name]
        if ctx.timeout_ms is not None:
            if ctx.timeout_ms <= 0:
                raise BadRequest("timeout must be a positive number of milliseconds")
            return Deadline(min(ceiling, ctx.timeout_ms / 1000))
        return Deadline(ceiling)

    # -- validation ----------------------------------------------------------------------

    # -- inference -----------------------------------------------------------------------

    async def infer(self, model_name: str, request: InferenceRequest, ctx: CallContext) -> Served:
        """Validate, route, call (with failover), and start the shadow copy."""
        plane = self.plane  # this request keeps to it, whatever a reload does meanwhile
        model = self.model(model_name, plane)
        validate_request(model.name, model.config, request)
        plan = model.plan(ctx.pin, ctx.route_key)
        deadline = self.deadline_for(model, ctx, plane)
        model_limiter = plane.model_limiters.get(model_name)
        if model_limiter is not None:
            try:
                await model_limiter.acquire(deadline)
            except Overloaded:
                self.metrics.shed.labels(model_name, "model_concurrency").inc()
                raise
        try:
            served = await self._serve(model, plan, request, deadline, ctx.trace)
        finally:
            if model_limiter is not None:
                model_limiter.release()
        shadow = model.shadow_for(served.route)
        if shadow is not None and self.rng.random() < shadow[1]:
            self._start_shadow(model, shadow[0], request, served, ctx.trace)
        return served

    async def _serve(
        self,
        model: ModelRouter,
        plan: list[Route],
        request: InferenceRequest,
        deadline: Deadline,
        trace: RequestTrace | None,
    ) -> Served:
        last = len(plan) - 1
        rollout = model.rollout
        for index, route in enumerate(plan):
            try:
                served = await self.call_route(
                    model.name, route, request, deadline, trace, failover=index > 0
                )
            except DuoServeError as error:
                error.route = route  # who failed, for the metrics' framework and backend labels
                if rollout is not None and error.status >= 500:
                    rollout.observe_call(_side(model, route), False, None)
                if isinstance(error, NOT_PROCESSED) and index < last and not deadline.expired():
                    continue  # not processed: the next route may serve it
                raise
            if rollout is not None:
                rollout.observe_call(_side(model, route), True, served.backend_s)
            if index > 0:
                self.metrics.failovers.labels(model.name, route.framework).inc()
            return served
        raise AssertionError("a plan has at least one route, and its last one returns or raises")

    async def call_route(
        self,
        model_name: str,
        route: Route,
        request: InferenceRequest,
        deadline: Deadline,
        trace: RequestTrace | None = None,
        *,
        failover: bool = False,
    ) -> Served:
        """One route: its circuit and concurrency limit, then the backend call, retried (on
        another replica where there is one) while the backend did not process the request.
        ``trace``: each call is a span of it; ``failover``: not the request's first route."""
        guard = route.guard
        assert guard is not None, "the data plane's routes carry their backend's guard"
        target = request.with_target(route.model, request.version or route.version, route.framework)
        with _Retries(self.retry_budget, guard.retries) as retries:
            while True:
                self._admit(model_name, route, guard)
                await self._acquire(model_name, guard, deadline)
                try:
                    return await self._attempt(
                        model_name,
                        route,
                        guard,
                        target,
                        deadline,
                        retries.tried,
                        trace,
                        retries.count + 1,
                        failover,
                    )
                except BACKEND_FAULTS as error:
                    elsewhere = self._fault(model_name, route, guard, error)
                    if not retries.another(error, deadline):
                        raise
                    self.metrics.retries.labels(route.backend_name, error.reason).inc()
                    if not elsewhere:  # the same replica(s) again: give them a moment
                        await asyncio.sleep(min(backoff_s(retries.count), deadline.remaining() / 2))

    def _admit(self, model_name: str, route: Route, guard: BackendGuard) -> None:
        """Unavailable at once while the backend's circuit is open."""
        if guard.breaker.allow():
            return
        self.metrics.backend_errors.labels(
            model_name, route.backend_name, route.framework, "circuit_open"
        ).inc()
        raise Unavailable(
            f"the {route.framework} backend for model '{model_name}' is failing; its circuit "
            "is open",
            reason="circuit_open",
            retry_after_s=guard.breaker.retry_after_s(),
        )

    async def _acquire(self, model_name: str, guard: BackendGuard, deadline: Deadline) -> None:
        """A slot of the backend's concurrency limit, or Overloaded (shed, counted)."""
        try:
            await guard.limiter.acquire(deadline)
        except Overloaded:
            guard.breaker.record_neutral()
            self.metrics.shed.labels(model_name, "backend_concurrency").inc()
            raise

    async def _attempt(
        self,
        model_name: str,
        route: Route,
        guard: BackendGuard,
        target: InferenceRequest,
        deadline: Deadline,
        tried: list[str],
        trace: RequestTrace | None = None,
        attempt: int = 1,
        failover: bool = False,
    ) -> Served:
        """One backend call in its acquired slot: timed, counted in flight, the slot released
        and the circuit told how it went. BACKEND_FAULTS reach the caller, which judges them
        (_fault); any other failure of the backend's own code becomes an UpstreamError. With a
        ``trace``, the call carries its trace context (and is a span of its own when the
        request is sampled)."""
        carrier = None
        if trace is not None:
            carrier = trace.call(route, attempt, failover)
            target.trace = carrier
        in_flight = self.metrics.backend_in_flight.labels(route.backend_name, route.framework)
        in_flight.inc()
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            response = await route.backend.infer(target, deadline, avoid=tried)
        except BACKEND_FAULTS as error:
            failure = error
            raise
        except (DuoServeError, asyncio.CancelledError) as error:
            failure = error
            guard.breaker.record_neutral()  # the client's input, or the client left
            raise
        except Exception as error:  # a backend bug must not become a 500 with a trace
            guard.breaker.record_failure()
            self.metrics.backend_errors.labels(
                model_name, route.backend_name, route.framework, "backend_error"
            ).inc()
            log.exception("backend %s failed unexpectedly", route.backend_name)
            failure = UpstreamError(
                f"the {route.framework} backend failed while serving '{model_name}'"
            )
            raise failure from error
        finally:
            elapsed = time.perf_counter() - started
            in_flight.dec()
            guard.limiter.release()
            if trace is not None and carrier is not None:
                trace.called(carrier, failure)
        guard.breaker.record_success()
        exemplar = None
        if trace is not None and trace.trace_id is not None:
            exemplar = {"trace_id": trace.trace_id}
        self.metrics.backend_duration.labels(
            model_name, route.framework, route.backend_name
        ).observe(elapsed, exemplar)
        return Served(response, route, elapsed)

    def _fault(
        self, model_name: str, route: Route, guard: BackendGuard, error: DuoServeError
    ) -> bool:
        """Count a backend fault, and tell the circuit unless a replica other than the one
        that failed is healthy: one replica failing among healthy ones is the replica's
        problem (outlier ejection handles it); the circuit opens only when none works.
        Returns whether another replica is healthy."""
        elsewhere = route.backend.healthy_elsewhere(error.endpoint)
        if elsewhere:
            guard.breaker.record_neutral()
        else:
            guard.breaker.record_failure()
        self.metrics.backend_errors.labels(
            model_name, route.backend_name, route.framework, error.reason
        ).inc()
        return elsewhere

    # -- shadow --------------------------------------------------------------------------

    def _start_shadow(
        self,
        model: ModelRouter,
        route: Route,
        request: InferenceRequest,
        primary: Served,
        trace: RequestTrace | None = None,
    ) -> None:
        leg = trace.leg("shadow", model.name, route) if trace is not None else None
        task = asyncio.get_running_loop().create_task(
            self._shadow(model, route, request, primary, leg)
        )
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self,
        model: ModelRouter,
        route: Route,
        request: InferenceRequest,
        primary: Served,
        trace: RequestTrace | None = None,
    ) -> None:
        assert route.guard is not None
        deadline = Deadline(route.guard.timeout_s)
        rollout = model.rollout if model.is_target(route) else None
        try:
            shadow = await self.call_route(model.name, route, request, deadline, trace)
        except DuoServeError as error:
            self.metrics.shadow_requests.labels(
                model.name, route.framework, str(error.status)
            ).inc()
            if rollout is not None and error.status >= 500:
                rollout.observe_call("target", False, None)
            if trace is not None:
                trace.leg_done(error)
            return
        except Exception as error:  # noqa: BLE001 - a shadow must never take the gateway down
            log.exception("shadow call of model %s failed", model.name)
            self.metrics.shadow_requests.labels(model.name, route.framework, "500").inc()
            if rollout is not None:
                rollout.observe_call("target", False, None)
            if trace is not None:
                trace.leg_done(error)
            return
        except asyncio.CancelledError as error:  # shutdown: the copy was not finished
            if trace is not None:
                trace.leg_done(error)
            raise
        self.metrics.shadow_requests.labels(model.name, route.framework, "200").inc()
        agreement = compare_outputs(primary.response, shadow.response)
        if trace is not None:
            trace.leg_done(
                None,
                {
                    "duoserve.shadow.rows": agreement["rows"],
                    "duoserve.shadow.argmax_agree": agreement["argmax_agree"],
                    "duoserve.shadow.max_abs_diff": agreement["max_abs_diff"],
                },
            )
        if rollout is not None:
            rollout.observe_call("target", True, shadow.backend_s)
            rollout.observe_comparison(
                agreement["rows"],
                agreement["rows"] - agreement["argmax_agree"],
                agreement["max_abs_diff"],
            )
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
        trace = ctx.trace

        async def one(route: Route) -> Served | DuoServeError:
            leg = trace.leg("compare", model_name, route) if trace is not None else None
            try:
                served = await self.call_route(model_name, route, request, deadline, leg)
            except DuoServeError as error:
                if leg is not None:
                    leg.leg_done(error)
                return error
            except BaseException as error:
                if leg is not None:
                    leg.leg_done(error)
                raise
            if leg is not None:
                leg.leg_done(None)
            return served

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
            if route.guard is None or route.guard.breaker.state != "open"
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


# -- configuration helpers -------------------------------------------------------------------


def route_targets(config: GatewayConfig) -> dict[str, set[tuple[str, str]]]:
    """(framework, model name on the backend) of every route, shadow and rollout target, by
    backend."""
    found: dict[str, set[tuple[str, str]]] = {}
    for model_name, model in config.models.items():
        routes = [*model.routes, *([model.shadow] if model.shadow else [])]
        if model.rollout is not None:
            routes.append(model.rollout.to)
        for route in routes:
            found.setdefault(route.backend, set()).add((route.framework, route.model or model_name))
    return found


def register_routes(config: GatewayConfig, backends: dict[str, Backend]) -> None:
    """Tell backends that take it (embedded runtimes, TF Serving) the models their routes
    point at, with the declared signatures: embedded runtimes load only those."""
    for model_name, model in config.models.items():
        routes = [*model.routes, *([model.shadow] if model.shadow else [])]
        if model.rollout is not None:
            routes.append(model.rollout.to)
        for route in routes:
            backend = backends.get(route.backend)
            register = getattr(backend, "register", None)
            if register is not None:
                register(route.framework, route.model or model_name, model.inputs, model.outputs)


# -- signature and comparison helpers -------------------------------------------------------


class _Retries:
    """One request's retries of one route, counted in the shared budget while it lasts."""

    __slots__ = ("budget", "allowed", "count", "tried")

    def __init__(self, budget: RetryBudget, allowed: int) -> None:
        self.budget = budget
        self.allowed = allowed
        self.count = 0
        self.tried: list[str] = []  # replicas that did not process this request

    def __enter__(self) -> _Retries:
        self.budget.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.budget.active -= 1
        if self.count:
            self.budget.retrying -= 1

    def another(self, error: DuoServeError, deadline: Deadline) -> bool:
        """Whether to call again after ``error``: only a call the backend did not process,
        within the route's retries and the budget, with time left. A replica named by the
        error is avoided next time."""
        if not (
            isinstance(error, NOT_PROCESSED)
            and self.count < self.allowed
            and self.budget.can_retry()
            and deadline.remaining() > 0.005
        ):
            return False
        if self.count == 0:
            self.budget.retrying += 1  # until this request ends, retries included
        self.count += 1
        if error.endpoint is not None:
            self.tried.append(error.endpoint)
        return True


class ReloadError(Exception):
    """A new configuration could not be put in place; the old one keeps serving."""


async def _logged(work: Awaitable[None]) -> None:
    try:
        await work
    except Exception:  # noqa: BLE001 - housekeeping must never take the gateway down
        log.exception("closing what a reload replaced failed")


def _side(model: ModelRouter, route: Route) -> str:
    return "target" if model.is_target(route) else "current"


def _fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    wanted = spec.shape
    if len(shape) != len(wanted):
        return False
    for want, got in zip(wanted, shape):  # noqa: B905 (lengths checked above)
        if want != -1 and want != got:
            return False
    return True


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
        shape = tensor.data.shape
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
