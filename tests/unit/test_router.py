"""Route choice: weights, sticky keys, pins, and the failover plan."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from duoserve.backends.embedded import EmbeddedBackend
from duoserve.config import EmbeddedBackendConfig, ModelConfig
from duoserve.errors import BadRequest
from duoserve.router import ModelRouter, sticky_fraction
from tests.conftest import DIGITS_IO
from tests.servers import REPO

# The router only needs backends' identities; unstarted embedded backends load nothing.
BACKENDS = {
    name: EmbeddedBackend(name, EmbeddedBackendConfig(kind="embedded"), REPO)
    for name in ("a", "b", "c")
}


def _router(routes: list[dict[str, Any]], seed: int = 7, **extra: Any) -> ModelRouter:
    config = ModelConfig.model_validate({**DIGITS_IO, "routes": routes, **extra})
    return ModelRouter("digits", config, BACKENDS, random.Random(seed))


def _route(backend: str, framework: str, weight: float, **extra: Any) -> dict[str, Any]:
    return {"backend": backend, "framework": framework, "weight": weight, **extra}


SPLIT = [_route("a", "pytorch", 90), _route("b", "tensorflow", 10)]


def test_weighted_split_within_tolerance() -> None:
    router = _router(SPLIT)
    counts = Counter(router.plan()[0].framework for _ in range(4000))
    assert counts["pytorch"] + counts["tensorflow"] == 4000
    assert abs(counts["tensorflow"] / 4000 - 0.10) < 0.02


def test_three_way_split() -> None:
    router = _router(
        [_route("a", "pytorch", 1), _route("b", "tensorflow", 2), _route("c", "pytorch", 1)]
    )
    counts = Counter(router.plan()[0].backend_name for _ in range(4000))
    assert abs(counts["a"] / 4000 - 0.25) < 0.03
    assert abs(counts["b"] / 4000 - 0.50) < 0.03
    assert abs(counts["c"] / 4000 - 0.25) < 0.03


def test_zero_weight_route_is_never_chosen() -> None:
    router = _router([_route("a", "pytorch", 1), _route("b", "tensorflow", 0)])
    assert {router.plan()[0].backend_name for _ in range(500)} == {"a"}


def test_sticky_key_always_picks_the_same_route() -> None:
    router = _router(SPLIT, seed=1)
    for key in ("user-1", "user-2", "tenant/42", "ü"):
        chosen = {router.plan(route_key=key)[0].framework for _ in range(50)}
        assert len(chosen) == 1, key
    # ... also across router instances (gateway replicas) with different random seeds.
    other = _router(SPLIT, seed=99)
    for i in range(100):
        key = f"user-{i}"
        assert router.plan(route_key=key)[0].framework == other.plan(route_key=key)[0].framework


def test_sticky_keys_spread_by_weight() -> None:
    router = _router(SPLIT)
    counts = Counter(router.plan(route_key=f"user-{i}")[0].framework for i in range(4000))
    assert abs(counts["tensorflow"] / 4000 - 0.10) < 0.02


def test_sticky_fraction_range() -> None:
    values = [sticky_fraction(f"k{i}") for i in range(1000)]
    assert all(0 <= v < 1 for v in values)
    assert sticky_fraction("same") == sticky_fraction("same")


@pytest.mark.parametrize("pin", ["tensorflow", " TensorFlow ", "TENSORFLOW"])
def test_pin_chooses_the_framework(pin: str) -> None:
    router = _router(SPLIT)
    assert {router.plan(pin=pin)[0].framework for _ in range(200)} == {"tensorflow"}


def test_pin_beats_route_key() -> None:
    router = _router(SPLIT)
    key = next(
        f"k{i}" for i in range(1000) if router.plan(route_key=f"k{i}")[0].backend_name == "a"
    )
    assert router.plan(pin="tensorflow", route_key=key)[0].framework == "tensorflow"


def test_pin_to_zero_weight_framework_still_served() -> None:
    # A route with weight 0 takes no split traffic but can be pinned (e.g. a dark launch).
    router = _router([_route("a", "pytorch", 1), _route("b", "tensorflow", 0)])
    assert router.plan(pin="tensorflow")[0].backend_name == "b"


def test_unknown_pin() -> None:
    with pytest.raises(BadRequest, match="must be one of pytorch, tensorflow, not 'jax'"):
        _router(SPLIT).plan(pin="jax")


def test_pin_to_a_framework_the_model_lacks() -> None:
    router = _router([_route("a", "pytorch", 1)])
    with pytest.raises(BadRequest, match="has no tensorflow route; it is served by: pytorch"):
        router.plan(pin="tensorflow")


def test_no_failover_plan_has_one_route() -> None:
    router = _router(SPLIT)
    assert all(len(router.plan()) == 1 for _ in range(100))


def test_failover_plan_order() -> None:
    routes = [
        _route("a", "pytorch", 1),
        _route("b", "tensorflow", 5),
        _route("c", "pytorch", 3),
    ]
    router = _router(routes, failover=True)
    seen = set()
    for _ in range(300):
        plan = router.plan()
        first, rest = plan[0], plan[1:]
        seen.add(first.backend_name)
        # Everything else follows, heaviest first.
        assert {r.backend_name for r in plan} == {"a", "b", "c"}
        weights = [r.weight for r in rest]
        assert weights == sorted(weights, reverse=True)
    assert seen == {"a", "b", "c"}


def test_failover_skips_routes_on_the_same_backend() -> None:
    # Two routes on one backend: if that backend is down, the other route is no help.
    routes = [
        _route("a", "pytorch", 1, model="v1"),
        _route("a", "pytorch", 0, model="v2"),
        _route("b", "tensorflow", 0),
    ]
    plan = _router(routes, failover=True).plan()
    assert [(r.backend_name, r.model) for r in plan] == [("a", "v1"), ("b", "digits")]


def test_pinned_plan_never_fails_over_to_another_framework() -> None:
    routes = [
        _route("a", "pytorch", 2),
        _route("b", "tensorflow", 5),
        _route("c", "pytorch", 1),
    ]
    router = _router(routes, failover=True)
    for _ in range(200):
        plan = router.plan(pin="pytorch")
        assert {r.framework for r in plan} == {"pytorch"}
        assert len(plan) == 2
    (only,) = router.plan(pin="tensorflow")
    assert only.backend_name == "b"


def test_route_defaults_to_the_logical_model_name() -> None:
    router = _router([_route("a", "pytorch", 1), _route("b", "tensorflow", 1, model="other")])
    assert sorted((r.backend_name, r.model) for r in router.routes) == [
        ("a", "digits"),
        ("b", "other"),
    ]
    assert router.frameworks == ["pytorch", "tensorflow"]


class _Share:
    """Stands in for a Rollout: only the target's share matters to routing."""

    def __init__(self, percent: float) -> None:
        self.target_share = percent
        self.shadow_sample = 0.0


def test_a_rollout_target_gets_its_share_and_sticky_keys_stay_as_it_grows() -> None:
    rollout = {
        "to": {"backend": "c", "framework": "pytorch"},
        "start": "2026-12-01T10:00:00Z",
    }
    router = _router([_route("b", "tensorflow", 1)], rollout=rollout)
    keys = [f"user-{i}" for i in range(2000)]
    on_target: set[str] = set()
    for percent in (5, 25, 50, 100):
        router.rollout = _Share(percent)  # type: ignore[assignment]
        chosen = {key: router.plan(route_key=key)[0] for key in keys}
        now = {key for key, route in chosen.items() if router.is_target(route)}
        assert abs(len(now) / len(keys) - percent / 100) < 0.04, (percent, len(now))
        assert on_target <= now  # a key on the target stays there as its share grows
        on_target = now
        counts = Counter(router.plan()[0].framework for _ in range(3000))
        assert abs(counts["pytorch"] / 3000 - percent / 100) < 0.04, (percent, counts)
    # At 100 % the current route is still there for failover.
    assert [r.framework for r in router.plan()] == ["pytorch"]
    failover = _router([_route("b", "tensorflow", 1)], rollout=rollout, failover=True)
    failover.rollout = _Share(100)  # type: ignore[assignment]
    assert [r.framework for r in failover.plan()] == ["pytorch", "tensorflow"]
    # Rolled back (share 0): the target gets nothing, pinned or not.
    router.rollout = _Share(0)  # type: ignore[assignment]
    assert {router.plan()[0].framework for _ in range(200)} == {"tensorflow"}
    with pytest.raises(BadRequest, match="has no pytorch route"):
        router.plan(pin="pytorch")
