"""Route choice: pin header > sticky key > weights; the failover order after it.

A model's routes are (backend, framework, backend model name, version, weight). The plan for
one request is the chosen route first, then, when the model allows failover, the others that
may stand in for it (same framework when the client pinned one), heaviest first.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from duoserve.backends.base import Backend
from duoserve.config import FRAMEWORKS, ModelConfig, RouteConfig
from duoserve.errors import BadRequest
from duoserve.resilience import BackendGuard

if TYPE_CHECKING:
    from duoserve.rollout import Rollout


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve a logical model."""

    backend: Backend
    framework: str
    model: str
    version: str | None
    weight: float
    guard: BackendGuard | None = None
    """The backend's limiter and circuit (the data plane's routes always have one)."""

    @property
    def backend_name(self) -> str:
        return self.backend.name


def build_route(
    model_name: str,
    config: RouteConfig,
    backends: dict[str, Backend],
    guards: dict[str, BackendGuard] | None = None,
) -> Route:
    return Route(
        backend=backends[config.backend],
        framework=config.framework,
        model=config.model or model_name,
        version=config.version,
        weight=config.weight,
        guard=guards.get(config.backend) if guards else None,
    )


def sticky_fraction(key: str) -> float:
    """A stable number in [0, 1) for a route key: the same key always picks the same route."""
    digest = hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ModelRouter:
    """Chooses among one model's routes."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        backends: dict[str, Backend],
        rng: random.Random | None = None,
        guards: dict[str, BackendGuard] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.routes = [build_route(name, r, backends, guards) for r in config.routes]
        self.shadow = build_route(name, config.shadow, backends, guards) if config.shadow else None
        self.frameworks = sorted({r.framework for r in self.routes})
        self._rng = rng or random.Random()
        # A rollout moves a share of the traffic to its target route (rollout.py sets it).
        self.target = (
            build_route(name, config.rollout.to, backends, guards)
            if config.rollout is not None
            else None
        )
        self.rollout: Rollout | None = None
        self._with_target: dict[float, list[Route]] = {}

    def _routes_now(self) -> list[Route]:
        """The routes with the rollout target's current share, target first (so a sticky key
        that was on the target stays there as its share grows)."""
        if self.rollout is None or self.target is None:
            return self.routes
        share = self.rollout.target_share
        if share <= 0:
            return self.routes
        routes = self._with_target.get(share)
        if routes is None:
            total = sum(r.weight for r in self.routes)
            if share >= 100:
                routes = [replace(self.target, weight=1.0)]
                routes += [replace(r, weight=0.0) for r in self.routes]
            else:
                routes = [replace(self.target, weight=total * share / (100 - share))]
                routes += self.routes
            self._with_target[share] = routes
        return routes

    def is_target(self, route: Route) -> bool:
        """Whether ``route`` is this model's rollout target."""
        target = self.target
        return target is not None and (route.backend, route.framework) == (
            target.backend,
            target.framework,
        )

    def shadow_for(self, primary: Route) -> tuple[Route, float] | None:
        """Where to copy a request ``primary`` served, and how often: the rollout's target
        while it is measured (never the target's own answers), else the model's shadow."""
        if self.rollout is not None and self.target is not None:
            sample = self.rollout.shadow_sample
            if sample <= 0 or self.is_target(primary):
                return None
            return self.target, sample
        if self.shadow is not None and self.config.shadow is not None:
            return self.shadow, self.config.shadow.sample
        return None

    def _weighted(self, routes: list[Route], point: float) -> Route:
        total = sum(r.weight for r in routes)
        if total <= 0:
            return routes[0]
        threshold = point * total
        running = 0.0
        for route in routes:
            running += route.weight
            if threshold < running:
                return route
        return routes[-1]

    def plan(self, pin: str | None = None, route_key: str | None = None) -> list[Route]:
        """Routes to try, in order: the chosen one, then failover candidates."""
        routes = candidates = self._routes_now()
        if pin is not None:
            pin = pin.strip().lower()
            if pin not in FRAMEWORKS:
                raise BadRequest(
                    f"x-duoserve-framework must be one of {', '.join(FRAMEWORKS)}, not '{pin}'"
                )
            candidates = [r for r in routes if r.framework == pin]
            if not candidates:
                raise BadRequest(
                    f"model '{self.name}' has no {pin} route; "
                    f"it is served by: {', '.join(self.frameworks)}"
                )
        weighted = [r for r in candidates if r.weight > 0] or candidates
        point = sticky_fraction(route_key) if route_key else self._rng.random()
        chosen = self._weighted(weighted, point)
        if not self.config.failover:
            return [chosen]
        rest = sorted(
            (r for r in candidates if r is not chosen and r.backend is not chosen.backend),
            key=lambda r: -r.weight,
        )
        return [chosen, *rest]
