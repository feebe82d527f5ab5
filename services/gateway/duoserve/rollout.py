"""Gated, self-reverting rollouts: move a model's traffic to a target route in steps, each step
gated on the target's errors, latency and agreement with the routes it replaces.

Phases: *pending* (before ``start``), *shadow* (the target gets copies of a sample of requests;
no user sees its answers), each *step* (the target serves that percent of requests, and a sample
of the others keeps being copied to it, so agreement is measured all along), then *done* (the
target serves everything). Any gate failing moves the rollout to *rolled back*: the target gets
no traffic and no copies until the rollout block changes.

Every replica must take the same decisions at the same moments without talking to the others.
So decisions are taken only at points of one grid, ``start + k * evaluate_interval_s``; a phase
starts at such a point, and may pass at the first point at least ``step_interval_s`` after it
where it has enough target calls and every gate passes. The numbers a decision reads cover the
phase up to that point: from a Prometheus (``gates_from``), asked with the ``@`` modifier at the
point itself once ``settle_s`` has let every replica's scrape land, so every replica reads the
same numbers; or, without one, from this replica's own counters.

A gate *fails* only when it can no longer pass: errors or disagreements beyond what the
threshold allows even at ``min_requests`` calls, any answer farther than ``max_abs_diff``, or,
once ``min_requests`` calls are in, a p99 ratio over its limit. So a target that fails is rolled
back at the next evaluation point, not at the end of its step.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson

from duoserve.config import RolloutConfig
from duoserve.metrics import LATENCY_BUCKETS, Metrics

log = logging.getLogger(__name__)

PENDING, SHADOW, STEP, DONE, ROLLED_BACK = "pending", "shadow", "step", "done", "rolled_back"
PHASES = (PENDING, SHADOW, STEP, DONE, ROLLED_BACK)
GATES = ("min_requests", "max_error_ratio", "max_p99_ratio", "min_agreement", "max_abs_diff")
HISTORY_LIMIT = 200


def rollout_id(config: RolloutConfig) -> str:
    """A short name for one rollout block: replicas use it to find each other's series, and a
    changed block starts a new rollout."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Numbers:
    """What the gates read about one phase (the current routes' p99: the whole rollout)."""

    target_calls: float = 0.0
    target_errors: float = 0.0
    target_p99: float | None = None
    current_p99: float | None = None
    compared_rows: float = 0.0
    disagreeing_rows: float = 0.0
    diff_exceeded: float = 0.0


@dataclass
class Gate:
    name: str
    value: float | None
    threshold: float
    state: str  # passed | failed | waiting

    def as_json(self) -> dict[str, Any]:
        return {"value": self.value, "threshold": self.threshold, "state": self.state}


def judge(config: RolloutConfig, phase: str, numbers: Numbers, share: float = 0.0) -> list[Gate]:
    """Each gate's value against its threshold for one phase: passed, failed (it can no
    longer pass), or waiting (not enough calls to tell). ``share``: the percent of requests
    the target serves in this phase (at 100 no request is left to copy to it)."""
    gates = config.gates
    need = config.shadow.min_requests if phase == SHADOW else gates.min_requests
    calls = numbers.target_calls
    enough = calls >= need
    result = [Gate("min_requests", calls, need, "passed" if enough else "waiting")]

    errors = numbers.target_errors
    ratio = errors / calls if calls else None
    if errors > gates.max_error_ratio * max(calls, need) or (
        enough and ratio is not None and ratio > gates.max_error_ratio
    ):
        state = "failed"
    else:
        state = "passed" if enough else "waiting"
    result.append(Gate("max_error_ratio", ratio, gates.max_error_ratio, state))

    p99_ratio = (
        numbers.target_p99 / numbers.current_p99
        if numbers.target_p99 is not None and numbers.current_p99
        else None
    )
    if not enough or p99_ratio is None:
        state = "waiting"
    else:
        state = "passed" if p99_ratio <= gates.max_p99_ratio else "failed"
    result.append(Gate("max_p99_ratio", p99_ratio, gates.max_p99_ratio, state))

    rows = numbers.compared_rows
    uncopied = share >= 100.0
    disagree = numbers.disagreeing_rows
    agreement = 1 - disagree / rows if rows else None
    allowed = (1 - gates.min_agreement) * max(rows, need)
    if disagree > allowed + 1e-9:
        state = "failed"
    elif rows >= need:
        state = "passed"
    elif phase == STEP and enough and (rows or uncopied):
        # At high steps few requests are left to copy from, and at 100 % none: the target's
        # own calls decide when they are in, as long as what was compared agrees (copies
        # sent in the step before may still land in this one).
        state = "passed"
    else:
        state = "waiting"
    result.append(Gate("min_agreement", agreement, gates.min_agreement, state))

    exceeded = numbers.diff_exceeded
    if exceeded > 0.5:
        state = "failed"
    elif rows or (phase == STEP and enough and uncopied):
        state = "passed"
    else:
        state = "waiting"
    result.append(Gate("max_abs_diff", exceeded, gates.max_abs_diff, state))
    return result


def bucket_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The q-quantile of a histogram (per-bucket counts, the last one +Inf), interpolated
    within its bucket as Prometheus' histogram_quantile does."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0.0
    for index, count in enumerate(counts):
        if running + count >= rank and count > 0:
            if index >= len(bounds):
                return bounds[-1]  # in +Inf: the highest finite bound, as Prometheus answers
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - running) / count
        running += count
    return bounds[-1]


class LocalGates:
    """Gate numbers from this replica's own counters: what they gained since the phase began
    (the current routes' p99: since the rollout began)."""

    def __init__(self, metrics: Metrics, model: str, rollout: str) -> None:
        self.metrics = metrics
        self.key = (model, rollout)
        self._rollout_mark = self._phase_mark = self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        m, key = self.metrics, self.key
        snap: dict[str, Any] = {
            f"{side}_{outcome}": m.rollout_calls.labels(*key, side, outcome).value
            for side in ("target", "current")
            for outcome in ("ok", "error")
        }
        for side in ("target", "current"):
            snap[f"{side}_buckets"] = list(m.rollout_call_duration.labels(*key, side).counts)
        snap["compared"] = m.rollout_compared_items.labels(*key).value
        snap["disagreeing"] = m.rollout_disagreeing_items.labels(*key).value
        snap["exceeded"] = m.rollout_diff_exceeded.labels(*key).value
        return snap

    def mark_rollout(self) -> None:
        self._rollout_mark = self._phase_mark = self._snapshot()

    def mark_phase(self) -> None:
        self._phase_mark = self._snapshot()

    async def read(self, since: float, until: float, rollout_since: float) -> Numbers:
        now, phase, first = self._snapshot(), self._phase_mark, self._rollout_mark

        def gained(name: str) -> float:
            return float(now[name] - phase[name])

        def p99(side: str, start: dict[str, Any]) -> float | None:
            counts = [a - b for a, b in zip(now[f"{side}_buckets"], start[f"{side}_buckets"],
                                            strict=True)]  # fmt: skip
            return bucket_quantile(0.99, LATENCY_BUCKETS, counts)

        return Numbers(
            target_calls=gained("target_ok") + gained("target_error"),
            target_errors=gained("target_error"),
            target_p99=p99("target", phase),
            current_p99=p99("current", first),
            compared_rows=gained("compared"),
            disagreeing_rows=gained("disagreeing"),
            diff_exceeded=gained("exceeded"),
        )


class PrometheusGates:
    """Gate numbers from a Prometheus that scrapes every gateway replica: the same query at
    the same evaluation time gives every replica the same numbers."""

    def __init__(self, url: str, model: str, rollout: str, timeout_s: float = 5.0) -> None:
        from duoserve.backends.httpclient import HTTPPool

        self.pool = HTTPPool(url, 4)
        self.model = model
        self.rollout = rollout
        self.timeout_s = timeout_s

    def _selector(self, extra: str = "") -> str:
        return f'model="{self.model}",rollout="{self.rollout}"' + (f",{extra}" if extra else "")

    async def query(self, expr: str, at: float | None = None) -> float | None:
        """One instant query; its single value, None when it has no data."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        reply = await self.pool.request(
            "GET", "/api/v1/query?" + urlencode(params), timeout_s=self.timeout_s
        )
        if reply.status != 200:
            raise OSError(f"Prometheus answered HTTP {reply.status}: {reply.body[:200]!r}")
        result = orjson.loads(reply.body)["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    async def read(self, since: float, until: float, rollout_since: float) -> Numbers:
        window = f"{max(1, round(until - since))}s"
        whole = f"{max(1, round(until - rollout_since))}s"

        def increase(name: str, extra: str = "", span: str = window) -> str:
            return f"sum(increase({name}{{{self._selector(extra)}}}[{span}]))"

        def p99(side: str, span: str) -> str:
            bucket = increase(
                "duoserve_rollout_call_duration_seconds_bucket", f'side="{side}"', span
            ).replace("sum(", "sum by (le) (", 1)
            return f"histogram_quantile(0.99, {bucket})"

        queries = {
            "target_calls": increase("duoserve_rollout_calls_total", 'side="target"'),
            "target_errors": increase(
                "duoserve_rollout_calls_total", 'side="target",outcome="error"'
            ),
            "target_p99": p99("target", window),
            "current_p99": p99("current", whole),
            "compared_rows": increase("duoserve_rollout_compared_items_total"),
            "disagreeing_rows": increase("duoserve_rollout_disagreeing_items_total"),
            "diff_exceeded": increase("duoserve_rollout_diff_exceeded_total"),
        }
        values = await asyncio.gather(*(self.query(q, until) for q in queries.values()))
        found = dict(zip(queries, values, strict=True))
        return Numbers(
            target_calls=found["target_calls"] or 0.0,
            target_errors=found["target_errors"] or 0.0,
            target_p99=found["target_p99"],
            current_p99=found["current_p99"],
            compared_rows=found["compared_rows"] or 0.0,
            disagreeing_rows=found["disagreeing_rows"] or 0.0,
            diff_exceeded=found["diff_exceeded"] or 0.0,
        )

    async def fleet_rolled_back(self) -> bool:
        """Whether any replica has rolled this rollout back."""
        value = await self.query(f"max(duoserve_rollout_rolled_back{{{self._selector()}}})")
        return bool(value)

    async def fleet_progress(self) -> tuple[float, float] | None:
        """The furthest (step number, phase start) any replica has reached, to join a rollout
        under way. Later phases start later, so the latest phase start is the furthest's."""
        step = await self.query(f"max(duoserve_rollout_step{{{self._selector()}}})")
        started = await self.query(
            f"max(duoserve_rollout_phase_started_seconds{{{self._selector()}}})"
        )
        return None if step is None or started is None else (step, started)

    async def close(self) -> None:
        await self.pool.close()


@dataclass
class Decision:
    at: float
    """The evaluation point the decision is for (on the grid every replica shares)."""
    phase: str
    step: int
    decision: str  # advance | rollback | done | join
    reason: str
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    taken_at: float = 0.0
    """When this replica took it and its routing changed: after ``at`` by the settle time and
    the tick, more when the process is busy."""

    def as_json(self) -> dict[str, Any]:
        return {
            "at": _rfc3339(self.at),
            "taken_at": _rfc3339(self.taken_at),
            "phase": self.phase,
            "step": self.step,
            "decision": self.decision,
            "reason": self.reason,
            "gates": self.gates,
        }


def _rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


class Rollout:
    """One model's rollout: its phase, the target's share, and the decisions taken."""

    def __init__(
        self,
        model: str,
        config: RolloutConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.id = rollout_id(config)
        self.phase = PENDING
        self.step = 0  # index into steps while in STEP
        self.phase_started = config.start_time
        self.history: list[Decision] = []
        self.gates: list[Gate] = []
        self._evaluated_until = config.start_time - config.evaluate_interval_s
        key = (model, self.id)
        self._key = key
        for side in ("target", "current"):
            for outcome in ("ok", "error"):
                metrics.rollout_calls.labels(*key, side, outcome)
            metrics.rollout_call_duration.labels(*key, side)
        for counter in (
            metrics.rollout_compared_items,
            metrics.rollout_disagreeing_items,
            metrics.rollout_diff_exceeded,
        ):
            counter.labels(*key)
        if config.gates_from is not None:
            self.reader: LocalGates | PrometheusGates = PrometheusGates(
                config.gates_from.prometheus, model, self.id
            )
            self.settle_s = config.gates_from.settle_s
        else:
            self.reader = LocalGates(metrics, model, self.id)
            self.settle_s = 0.0
        self._joined = False
        self._publish()

    # -- what routing asks ----------------------------------------------------------------

    @property
    def target_share(self) -> float:
        """Percent of requests the target serves now."""
        if self.phase == STEP:
            return self.config.steps[self.step]
        return 100.0 if self.phase == DONE else 0.0

    @property
    def shadow_sample(self) -> float:
        """Share of the current routes' requests copied to the target now."""
        return self.config.shadow.sample if self.phase in (SHADOW, STEP) else 0.0

    # -- what the data plane tells --------------------------------------------------------

    def observe_call(self, side: str, ok: bool, seconds: float | None) -> None:
        self.metrics.rollout_calls.labels(*self._key, side, "ok" if ok else "error").inc()
        if ok and seconds is not None:
            self.metrics.rollout_call_duration.labels(*self._key, side).observe(seconds)

    def observe_comparison(self, rows: int, disagreeing: int, max_abs_diff: float | None) -> None:
        self.metrics.rollout_compared_items.labels(*self._key).inc(rows)
        self.metrics.rollout_disagreeing_items.labels(*self._key).inc(disagreeing)
        if max_abs_diff is not None and max_abs_diff > self.config.gates.max_abs_diff:
            self.metrics.rollout_diff_exceeded.labels(*self._key).inc()

    # -- deciding -------------------------------------------------------------------------

    def _grid_point(self, at: float) -> float:
        """The latest evaluation point at or before ``at``."""
        interval = self.config.evaluate_interval_s
        start = self.config.start_time
        return start + math.floor((at - start) / interval + 1e-9) * interval

    async def tick(self) -> None:
        """Take the decisions due by now (called every fraction of a second)."""
        now = self.clock()
        if self.phase in (DONE, ROLLED_BACK):
            return
        if self.phase == PENDING:
            if now < self.config.start_time:
                return
            await self._begin()
        point = self._grid_point(now - self.settle_s)
        while self._evaluated_until < point and self.phase not in (DONE, ROLLED_BACK):
            at = self._evaluated_until + self.config.evaluate_interval_s
            if not await self._evaluate(at):
                return  # the numbers could not be read: try this point again next tick
            self._evaluated_until = at

    async def _begin(self) -> None:
        """Enter the shadow phase at ``start``, or join the fleet's rollout under way."""
        self.phase = SHADOW
        self.phase_started = self.config.start_time
        self._evaluated_until = self._grid_point(self.config.start_time)
        if isinstance(self.reader, LocalGates):
            # This replica's counters have no history: a rollout that started before this
            # process counts its shadow phase from now (on the grid), not from `start`.
            self.phase_started = max(self.phase_started, self._grid_point(self.clock()))
            self._evaluated_until = self.phase_started
            self.reader.mark_rollout()
        else:
            await self._join_fleet()
        self._publish()

    async def _join_fleet(self) -> None:
        assert isinstance(self.reader, PrometheusGates)
        try:
            if await self.reader.fleet_rolled_back():
                self._roll_back(self.clock(), "another replica rolled this rollout back", [])
                return
            progress = await self.reader.fleet_progress()
        except (OSError, TimeoutError, ValueError, KeyError) as error:
            log.warning("rollout of %s: cannot read the fleet's progress: %s", self.model, error)
            return
        if progress is None:
            return
        step, started = progress
        steps = len(self.config.steps)
        if step >= 1 and started > self.phase_started:
            self.phase = DONE if step > steps else STEP
            self.step = min(int(step) - 1, steps - 1)
            self.phase_started = started
            self._evaluated_until = started
            self._decide(self.clock(), "join", f"joined the fleet at step {int(step)}", [])

    async def _evaluate(self, at: float) -> bool:
        try:
            if isinstance(self.reader, PrometheusGates) and await self.reader.fleet_rolled_back():
                self._roll_back(at, "another replica rolled this rollout back", [])
                return True
            numbers = await self.reader.read(self.phase_started, at, self.config.start_time)
        except (OSError, TimeoutError, ValueError, KeyError) as error:
            log.warning("rollout of %s: cannot read its gates: %s", self.model, error)
            return False
        self.gates = judge(self.config, self.phase, numbers, self.target_share)
        self._publish_gates()
        failed = [g for g in self.gates if g.state == "failed"]
        if failed:
            reason = "; ".join(_why(g) for g in failed)
            self._roll_back(at, reason, self.gates)
            return True
        due = at - self.phase_started >= self.config.step_interval_s - 1e-6
        if due and all(g.state == "passed" for g in self.gates):
            self._advance(at)
        return True

    def _advance(self, at: float) -> None:
        steps = self.config.steps
        if self.phase == SHADOW:
            self.phase, self.step = STEP, 0
            reason = f"shadow phase passed its gates; target at {steps[0]:g} %"
        elif self.step + 1 < len(steps):
            self.step += 1
            reason = f"step passed its gates; target at {steps[self.step]:g} %"
        else:
            self.phase = DONE
            reason = "last step passed its gates; target serves every request"
        self.phase_started = at
        if isinstance(self.reader, LocalGates):
            self.reader.mark_phase()
        self._decide(at, "done" if self.phase == DONE else "advance", reason, self.gates)

    def _roll_back(self, at: float, reason: str, gates: list[Gate]) -> None:
        self.phase = ROLLED_BACK
        self.phase_started = at
        self._decide(at, "rollback", reason, gates)
        log.error("rollout of %s rolled back: %s", self.model, reason)

    def _decide(self, at: float, decision: str, reason: str, gates: list[Gate]) -> None:
        self.history.append(
            Decision(
                at,
                self.phase,
                self.step,
                decision,
                reason,
                {g.name: g.as_json() for g in gates},
                taken_at=self.clock(),
            )
        )
        del self.history[:-HISTORY_LIMIT]
        self.metrics.rollout_decisions.labels(self.model, decision).inc()
        if decision != "rollback":
            log.warning("rollout of %s: %s", self.model, reason)
        self._publish()

    # -- showing --------------------------------------------------------------------------

    @property
    def step_number(self) -> int:
        """0 pending or shadow, 1..n the step, n+1 done (what the metric says)."""
        if self.phase == STEP:
            return self.step + 1
        return len(self.config.steps) + 1 if self.phase == DONE else 0

    def _publish(self) -> None:
        m, key = self.metrics, self._key
        for phase in PHASES:
            m.rollout_phase.labels(*key, phase).set(1 if phase == self.phase else 0)
        m.rollout_step.labels(*key).set(self.step_number)
        m.rollout_phase_started.labels(*key).set(self.phase_started)
        m.rollout_target_weight.labels(*key).set(self.target_share / 100)
        m.rollout_rolled_back.labels(*key).set(1 if self.phase == ROLLED_BACK else 0)

    def _publish_gates(self) -> None:
        for gate in self.gates:
            if gate.value is not None:
                self.metrics.rollout_gate_value.labels(*self._key, gate.name).set(gate.value)
            self.metrics.rollout_gate_threshold.labels(*self._key, gate.name).set(gate.threshold)

    def status(self) -> dict[str, Any]:
        to = self.config.to
        return {
            "model": self.model,
            "rollout": self.id,
            "phase": self.phase,
            "step": self.step_number,
            "steps": self.config.steps,
            "target": {"backend": to.backend, "framework": to.framework, "model": to.model},
            "target_weight": self.target_share,
            "shadow_sample": self.shadow_sample,
            "phase_started": _rfc3339(self.phase_started),
            "gates_from": "prometheus" if self.config.gates_from else "local",
            "gates": {g.name: g.as_json() for g in self.gates},
            "history": [d.as_json() for d in self.history],
        }

    async def close(self) -> None:
        if isinstance(self.reader, PrometheusGates):
            await self.reader.close()

    def forget(self) -> None:
        """Drop this rollout's series (its block changed or went)."""
        for metric in self.metrics.rollout_metrics():
            metric.remove(*self._key)


def _why(gate: Gate) -> str:
    value = "n/a" if gate.value is None else f"{gate.value:.4g}"
    if gate.name == "max_abs_diff":
        return f"{gate.value:g} answers differed by more than {gate.threshold:g}"
    if gate.name == "min_agreement":
        return f"agreement {value} below {gate.threshold:g}"
    if gate.name == "max_error_ratio":
        return f"error ratio {value} above {gate.threshold:g}"
    return f"{gate.name} {value} beyond {gate.threshold:g}"
