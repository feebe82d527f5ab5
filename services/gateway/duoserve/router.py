"""Route choice: pin header > sticky key > weights; the failover order after it.

A model's routes are (backend, framework, backend model name, version, weight). The plan for
one request is the chosen route first, then, when the model allows failover, the others that
may stand in for it (same framework when the client pinned one), heaviest first.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from duoserve.backends.base import Backend
from duoserve.config import FRAMEWORKS, ModelConfig, RouteConfig
from duoserve.errors import BadRequest


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve a logical model."""

    backend: Backend
    framework: str
    model: str
    version: str | None
    weight: float

    @property
    def backend_name(self) -> str:
        return self.backend.name


def build_route(model_name: str, config: RouteConfig, backends: dict[str, Backend]) -> Route:
    return Route(
        backend=backends[config.backend],
        framework=config.framework,
        model=config.model or model_name,
        version=config.version,
        weight=config.weight,
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
    ) -> None:
        self.name = name
        self.config = config
        self.routes = [build_route(name, r, backends) for r in config.routes]
        self.shadow = build_route(name, config.shadow, backends) if config.shadow else None
        self.frameworks = sorted({r.framework for r in self.routes})
        self._rng = rng or random.Random()

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
        candidates = self.routes
        if pin is not None:
            pin = pin.strip().lower()
            if pin not in FRAMEWORKS:
                raise BadRequest(
                    f"x-duoserve-framework must be one of {', '.join(FRAMEWORKS)}, not '{pin}'"
                )
            candidates = [r for r in self.routes if r.framework == pin]
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
