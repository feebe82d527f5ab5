"""Rollouts: the gates' arithmetic, the schema's refusals, and whole rollouts through an
in-process gateway over the embedded runtimes (seconds-long steps, this replica's own counters).
tests/integration/test_rollout_live.py does the same with real servers and a real Prometheus."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from duoserve.config import ConfigError, RolloutConfig, parse_config
from duoserve.rollout import Numbers, bucket_quantile, judge
from tests.conftest import DIGITS_IO, STORE
from tests.timing import eventually
from tests.traffic import Traffic, gateway_from_file


def rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def rollout_block(**extra: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "to": {"backend": "local", "framework": "pytorch", "model": "digits"},
        "start": rfc3339(time.time()),
        "shadow": {"sample": 1.0, "min_requests": 30},
        "steps": [25, 50, 100],
        "step_interval_s": 1.0,
        "evaluate_interval_s": 0.25,
        # Embedded PyTorch and TensorFlow differ in speed on a shared machine: the latency
        # gate is tried on real servers (tests/integration/test_rollout_live.py).
        "gates": {"min_requests": 30, "max_p99_ratio": 20, "min_agreement": 0.99},
    }
    block.update(extra)
    return block


def config(rollout: dict[str, Any] | None) -> dict[str, Any]:
    digits: dict[str, Any] = {
        **DIGITS_IO,
        "routes": [{"backend": "local", "framework": "tensorflow", "model": "digits"}],
        "failover": True,
    }
    if rollout is not None:
        digits["rollout"] = rollout
    return {
        "backends": {"local": {"kind": "embedded", "model_store": str(STORE)}},
        "models": {"digits": digits},
    }


# -- the arithmetic -------------------------------------------------------------------------


def test_bucket_quantile_interpolates_as_prometheus_does() -> None:
    bounds = (0.01, 0.1, 1.0)
    # 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 in (0.1, 1].
    assert bucket_quantile(0.5, bounds, [50, 40, 10, 0]) == pytest.approx(0.01)
    assert bucket_quantile(0.9, bounds, [50, 40, 10, 0]) == pytest.approx(0.1)
    assert bucket_quantile(0.99, bounds, [50, 40, 10, 0]) == pytest.approx(0.1 + 0.9 * 0.9)
    assert bucket_quantile(0.99, bounds, [0, 0, 0, 5]) == 1.0  # in +Inf: the top bound
    assert bucket_quantile(0.99, bounds, [0, 0, 0, 0]) is None


def gates_of(phase: str = "step", share: float = 50.0, **numbers: Any) -> dict[str, str]:
    gates = {"min_requests": 100, "min_agreement": 0.99}
    block = RolloutConfig.model_validate(rollout_block(gates=gates))
    return {g.name: g.state for g in judge(block, phase, Numbers(**numbers), share)}


def test_gates_wait_for_enough_calls_and_then_pass() -> None:
    assert set(gates_of(target_calls=10).values()) == {"waiting"}
    passed = gates_of(target_calls=150, target_p99=0.011, current_p99=0.010, compared_rows=150)
    assert set(passed.values()) == {"passed"}


def test_an_error_gate_fails_as_soon_as_it_cannot_pass() -> None:
    # 1 % of 100 calls allowed: 2 errors in the first 5 calls can never get back under it.
    assert gates_of(target_calls=5, target_errors=2)["max_error_ratio"] == "failed"
    assert gates_of(target_calls=5, target_errors=1)["max_error_ratio"] == "waiting"
    assert gates_of(target_calls=300, target_errors=2)["max_error_ratio"] == "passed"


def test_disagreement_and_differences_fail_early_latency_only_with_enough_calls() -> None:
    # min_agreement 0.99 of at least 100 rows: a second disagreeing row is too many.
    assert gates_of(compared_rows=10, disagreeing_rows=1)["min_agreement"] == "waiting"
    assert gates_of(compared_rows=10, disagreeing_rows=2)["min_agreement"] == "failed"
    assert gates_of(compared_rows=10, diff_exceeded=1)["max_abs_diff"] == "failed"
    slow = {"target_p99": 0.05, "current_p99": 0.01}
    assert gates_of(target_calls=50, **slow)["max_p99_ratio"] == "waiting"
    assert gates_of(target_calls=100, **slow)["max_p99_ratio"] == "failed"


def test_a_step_at_100_percent_passes_on_the_targets_own_calls() -> None:
    # Every request goes to the target: none is left to copy, so nothing is compared.
    enough = {"target_calls": 150, "target_p99": 0.011, "current_p99": 0.010}
    assert set(gates_of(share=100, **enough).values()) == {"passed"}
    assert set(gates_of(share=100, target_calls=50).values()) == {"waiting"}
    # Below 100 % the agreement gates still wait for a comparison.
    below = gates_of(share=50, **enough)
    assert (below["min_agreement"], below["max_abs_diff"]) == ("waiting", "waiting")
    # Copies sent in the step before that land now still count, and can still fail it.
    late = gates_of(share=100, compared_rows=10, disagreeing_rows=2, **enough)
    assert late["min_agreement"] == "failed"
    beyond = gates_of(share=100, compared_rows=1, diff_exceeded=1, **enough)
    assert beyond["max_abs_diff"] == "failed"


def test_the_shadow_phase_counts_its_own_minimum() -> None:
    block = RolloutConfig.model_validate(
        rollout_block(shadow={"min_requests": 500}, gates={"min_requests": 100})
    )
    gates = {g.name: g.state for g in judge(block, "shadow", Numbers(target_calls=200))}
    assert gates["min_requests"] == "waiting"


# -- the schema -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "where", "words"),
    [
        ({"to": {"backend": "nowhere", "framework": "pytorch"}}, "rollout.to.backend",
         "no backend named 'nowhere'"),
        ({"steps": [5, 1, 100]}, "rollout.steps", "steps must increase"),
        ({"steps": [50, 150]}, "rollout.steps", "at most 100"),
        ({"steps": []}, "rollout.steps", "at least one step"),
        ({"start": "2026-12-01 10:00"}, "rollout.start", "not an RFC 3339 time"),
        ({"start": "2026-12-01T10:00:00"}, "rollout.start", "with an offset"),
        ({"start": "next tuesday"}, "rollout.start", "not an RFC 3339 time"),
        ({"start": "2026-13-45T10:00:00Z"}, "rollout.start", "not a valid time"),
        ({"gates": {"min_agreement": 1.5}}, "rollout.gates.min_agreement",
         "less than or equal to 1"),
        ({"gates": {"max_error_ratio": -0.1}}, "rollout.gates.max_error_ratio",
         "greater than or equal to 0"),
        ({"gates": {"min_requests": 0}}, "rollout.gates.min_requests",
         "greater than or equal to 1"),
        ({"gates_from": {"prometheus": "prometheus:9090"}}, "rollout.gates_from.prometheus",
         "should match pattern"),
        ({"shadow": {"sample": 0}}, "rollout.shadow.sample", "greater than 0"),
    ],
)  # fmt: skip
def test_bad_rollout_blocks_name_their_key(change: dict[str, Any], where: str, words: str) -> None:
    data = config(rollout_block(**change))
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    message = str(raised.value)
    assert f"models.digits.{where}" in message and words in message, message


def test_a_target_its_backend_cannot_run_is_refused() -> None:
    data = config(rollout_block(to={"backend": "tfs", "framework": "pytorch", "model": "digits"}))
    data["backends"]["tfs"] = {"kind": "tfserving", "grpc": "tfserving:8500"}
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert (
        "models.digits.rollout.to.framework: backend 'tfs' (tfserving) serves tensorflow "
        "models, not pytorch"
    ) in str(raised.value)


def test_a_target_that_is_already_a_route_or_a_shadow_beside_it_is_refused() -> None:
    same = config(
        rollout_block(to={"backend": "local", "framework": "tensorflow", "model": "digits"})
    )
    with pytest.raises(ConfigError, match="must differ from every route"):
        parse_config(same)
    both = config(rollout_block())
    both["models"]["digits"]["shadow"] = {"backend": "local", "framework": "pytorch"}
    with pytest.raises(ConfigError, match="remove 'shadow'"):
        parse_config(both)


# -- whole rollouts, in process -------------------------------------------------------------


def gateway(path: Path, data: dict[str, Any]) -> Any:
    return gateway_from_file(path, data, config_poll_s=0.1)


def status_of(app: Any) -> dict[str, Any]:
    result: dict[str, Any] = app.state.gateway.dataplane.rollout("digits").status()
    return result


async def test_a_rollout_between_twins_reaches_done_step_by_step(
    tmp_path: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    async with gateway(tmp_path / "models.yaml", config(rollout_block())) as (client, app):
        async with Traffic([client], digits_samples[0]).running() as traffic:
            await eventually(lambda: status_of(app)["phase"] == "done", "the rollout's end", 60)
        status = status_of(app)
    assert traffic.statuses() == {200}
    decisions = [(d["decision"], d["step"]) for d in status["history"]]
    assert [d for d, _ in decisions] == ["advance", "advance", "advance", "done"], decisions
    assert status["target_weight"] == 100

    # Within each step the target's share is its step's percent, within sampling bounds: from
    # when each decision was taken (its routing changed), which on a busy box may be a few
    # ticks after the evaluation point it was for.
    begins = [datetime.fromisoformat(d["taken_at"]).timestamp() for d in status["history"]]
    points = [datetime.fromisoformat(d["at"]).timestamp() for d in status["history"]]
    assert all(0 <= taken - at < 5 for taken, at in zip(begins, points, strict=True))
    phases = list(zip(begins, begins[1:], [25, 50, 100], strict=False))
    for start, end, percent in phases:
        served = traffic.frameworks(start + 0.05, end - 0.05)
        share = Counter(served)["pytorch"] / len(served)
        bound = 3 * (percent / 100 * (1 - percent / 100) / len(served)) ** 0.5 + 0.02
        assert abs(share - percent / 100) <= bound, (percent, share, len(served))
    # Before the first step only TensorFlow answered users.
    assert set(traffic.frameworks(until=begins[0] - 0.05)) == {"tensorflow"}


async def test_a_rollout_to_a_disagreeing_model_stops_before_any_user_sees_it(
    tmp_path: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    perturbed = rollout_block(
        to={"backend": "local", "framework": "pytorch", "model": "digits-perturbed"},
        shadow={"sample": 1.0, "min_requests": 200},
    )
    async with gateway(tmp_path / "models.yaml", config(perturbed)) as (client, app):
        async with Traffic([client], digits_samples[0]).running() as traffic:
            await eventually(lambda: status_of(app)["phase"] == "rolled_back", "the rollback", 60)
            rolled_back_at = time.time()
            await asyncio.sleep(1.5)  # several evaluation points later: still rolled back
        status = status_of(app)
    assert status["phase"] == "rolled_back" and status["target_weight"] == 0
    (decision,) = status["history"]
    assert decision["decision"] == "rollback" and decision["phase"] == "rolled_back"
    failed = {name for name, gate in decision["gates"].items() if gate["state"] == "failed"}
    assert failed & {"min_agreement", "max_abs_diff"}, decision
    assert "differed" in decision["reason"] or "agreement" in decision["reason"]
    assert set(traffic.frameworks()) == {"tensorflow"}
    assert traffic.statuses() == {200}
    assert traffic.frameworks(since=rolled_back_at)


async def test_a_rolled_back_rollout_stays_so_until_its_block_changes(
    tmp_path: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    path = tmp_path / "models.yaml"
    bad = config(
        rollout_block(
            to={"backend": "local", "framework": "pytorch", "model": "digits-perturbed"},
            shadow={"sample": 1.0, "min_requests": 200},
        )
    )
    async with gateway(path, bad) as (client, app):
        async with Traffic([client], digits_samples[0]).running() as traffic:
            await eventually(lambda: status_of(app)["phase"] == "rolled_back", "rollback", 60)
            first = status_of(app)["rollout"]
            # Another part of the file changes: the rollout is the same and stays rolled back.
            edited = copy.deepcopy(bad)
            edited["models"]["digits"]["timeout_ms"] = 4000
            path.write_text(yaml.safe_dump(edited))
            dataplane = app.state.gateway.dataplane
            await eventually(
                lambda: dataplane.config.models["digits"].timeout_ms == 4000, "the reload", 10
            )
            assert status_of(app)["phase"] == "rolled_back"
            assert status_of(app)["rollout"] == first
            # A new block (the fixed target, a new start) starts a new rollout.
            fixed = config(rollout_block())
            path.write_text(yaml.safe_dump(fixed))
            await eventually(lambda: status_of(app)["rollout"] != first, "the new rollout", 10)
            await eventually(lambda: status_of(app)["phase"] == "done", "the new rollout's end", 60)
    assert traffic.statuses() == {200}
