"""Every Prometheus metric the gateway exports, on a registry passed in.

Names and labels are a contract with deploy/prometheus (recording and alert rules) and
deploy/grafana (dashboards): change them together. Label values are low-cardinality: model,
framework, backend, protocol, code, reason. Health and metrics requests are never counted.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

# 0.5 ms .. 10 s: millisecond inference and the gateway's own sub-millisecond overhead.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DIFF_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class _GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "created", "exemplars")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.created = time.time()
        self.exemplars: list[Exemplar | None] | None = None  # per bucket, once there is one

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        """Count ``value``; ``exemplar`` (labels such as ``{"trace_id": ...}``) becomes its
        bucket's exemplar, replacing the previous one, as prometheus_client's Histogram does.
        Exemplars appear in the OpenMetrics exposition only."""
        # bounds[i] is the first bound >= value: Prometheus' "le" (less than or equal).
        index = bisect_left(self.bounds, value)
        self.counts[index] += 1
        self.sum += value
        if exemplar is not None:
            exemplars = self.exemplars
            if exemplars is None:
                exemplars = self.exemplars = [None] * len(self.counts)
            exemplars[index] = Exemplar(exemplar, value, time.time())


class LoopMetric:
    """A labelled metric family for values updated on the event loop only.

    prometheus_client's metrics take a lock and validate labels on every update: about 15 us
    of the gateway's ~90 us of Python per request. Every update here happens on the event loop
    thread (the loop also serves /metrics), so children are plain attributes, found in one dict
    lookup; the exposition is prometheus_client's own, from ``collect()``. Names, types and
    samples are those of prometheus_client's Counter, Gauge and Histogram.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            key = tuple(str(v) for v in values)
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children.get(key) or self._new_child()
            self._children[key] = child
        return child

    def remove(self, *values: str) -> None:
        """Drop the series whose first labels are ``values`` (e.g. a replica that left)."""
        prefix = tuple(str(v) for v in values)
        for key in [k for k in self._children if k[: len(prefix)] == prefix]:
            del self._children[key]

    def _new_child(self) -> Any:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Any, values: list[str], child: Any) -> None:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            self._add(family, list(values), child)
        return [family]


class LoopCounter(LoopMetric):
    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: CounterMetricFamily, values: list[str], child: _CounterChild) -> None:
        family.add_metric(values, child.value, created=child.created)


class LoopGauge(LoopMetric):
    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: GaugeMetricFamily, values: list[str], child: _GaugeChild) -> None:
        family.add_metric(values, child.value)


class LoopHistogram(LoopMetric):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram buckets must be increasing")
        # The "le" values prometheus_client's own Histogram writes (Go's float format).
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(
        self, family: HistogramMetricFamily, values: list[str], child: _HistogramChild
    ) -> None:
        cumulative = 0
        buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
        exemplars = child.exemplars
        for index, (le, count) in enumerate(zip(self._le, child.counts, strict=True)):
            cumulative += count
            exemplar = exemplars[index] if exemplars is not None else None
            buckets.append((le, cumulative) if exemplar is None else (le, cumulative, exemplar))
        family.add_metric(values, buckets, child.sum)


class Metrics:
    """The gateway's metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = LoopCounter(
            "duoserve_requests",
            "Inference requests answered by the gateway, by who served them and the HTTP status.",
            ["model", "framework", "backend", "protocol", "code"],
            registry=registry,
        )
        self.request_duration = LoopHistogram(
            "duoserve_request_duration_seconds",
            "Time from request received to response ready, whole gateway.",
            ["model", "framework", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backend_duration = LoopHistogram(
            "duoserve_backend_request_duration_seconds",
            "Time spent waiting on the backend for one successful call.",
            ["model", "framework", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = LoopGauge(
            "duoserve_requests_in_flight",
            "Inference requests being handled by the gateway now.",
            ["protocol"],
            registry=registry,
        )
        self.backend_in_flight = LoopGauge(
            "duoserve_backend_requests_in_flight",
            "Calls to a backend in flight now (the per-framework load signal for autoscaling).",
            ["backend", "framework"],
            registry=registry,
        )
        self.items = LoopCounter(
            "duoserve_inferred_items",
            "Rows (first dimension of the first input) inferred successfully.",
            ["model", "framework"],
            registry=registry,
        )
        self.request_size = LoopHistogram(
            "duoserve_request_size_bytes",
            "Size of inference request bodies.",
            ["protocol"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.response_size = LoopHistogram(
            "duoserve_response_size_bytes",
            "Size of inference response bodies.",
            ["protocol"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.backend_up = LoopGauge(
            "duoserve_backend_up",
            "1 when the backend answered its last readiness probe, else 0.",
            ["backend", "framework"],
            registry=registry,
        )
        self.backend_errors = LoopCounter(
            "duoserve_backend_errors",
            "Failed backend calls by reason (timeout, backend_down, overloaded, ...).",
            ["model", "backend", "framework", "reason"],
            registry=registry,
        )
        self.shed = LoopCounter(
            "duoserve_shed_requests",
            "Requests refused before any work: concurrency limit, rate limit, draining.",
            ["model", "reason"],
            registry=registry,
        )
        self.client_timeouts = LoopCounter(
            "duoserve_client_timeouts",
            "Client connections closed because a request's head or body came too slowly "
            "(reason: head, body_idle, body_total).",
            ["reason"],
            registry=registry,
        )
        self.rejected_connections = LoopCounter(
            "duoserve_rejected_connections",
            "Client connections refused or closed before their request reached the app "
            "(reason: connection_limit, head_too_large).",
            ["reason"],
            registry=registry,
        )
        self.client_connections = LoopGauge(
            "duoserve_client_connections",
            "Client connections open now in this worker process (refused ones not counted).",
            [],
            registry=registry,
        )
        self.retries = LoopCounter(
            "duoserve_retries",
            "Backend calls retried because the backend had not processed them.",
            ["backend", "reason"],
            registry=registry,
        )
        self.failovers = LoopCounter(
            "duoserve_failovers",
            "Requests served by another route after the first failed; framework: who served.",
            ["model", "framework"],
            registry=registry,
        )
        self.circuit_state = LoopGauge(
            "duoserve_circuit_state",
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
            ["backend"],
            registry=registry,
        )
        self.shadow_requests = LoopCounter(
            "duoserve_shadow_requests",
            "Shadow copies sent, by the shadow's framework and outcome (code).",
            ["model", "framework", "code"],
            registry=registry,
        )
        self.shadow_disagreements = LoopCounter(
            "duoserve_shadow_disagreements",
            "Shadow answers whose argmax differed from the primary's for at least one row.",
            ["model", "framework"],
            registry=registry,
        )
        self.shadow_compared_items = LoopCounter(
            "duoserve_shadow_compared_items",
            "Rows compared between primary and shadow.",
            ["model", "framework"],
            registry=registry,
        )
        self.shadow_disagreeing_items = LoopCounter(
            "duoserve_shadow_disagreeing_items",
            "Rows whose argmax differed between primary and shadow.",
            ["model", "framework"],
            registry=registry,
        )
        self.backend_batch_rows = LoopHistogram(
            "duoserve_backend_batch_rows",
            "Rows per call to a backend that coalesces requests (models.yaml coalesce): its "
            "_count is the calls sent, its _sum the rows they carried.",
            ["backend"],
            buckets=ROWS_BUCKETS,
            registry=registry,
        )
        self.shadow_max_abs_diff = LoopHistogram(
            "duoserve_shadow_max_abs_diff",
            "Largest absolute difference between primary and shadow outputs, per request.",
            ["model", "framework"],
            buckets=DIFF_BUCKETS,
            registry=registry,
        )

        # Per replica of a remote backend (label endpoint = host:port, bounded by the replica
        # count: a replica's series go when it leaves DNS).
        self.endpoint_requests = LoopCounter(
            "duoserve_endpoint_requests",
            "Calls to one replica (endpoint) of a backend, whatever their outcome.",
            ["backend", "endpoint"],
            registry=registry,
        )
        self.endpoint_failures = LoopCounter(
            "duoserve_endpoint_failures",
            "Failed calls to one replica by reason (the ones that count towards ejecting it).",
            ["backend", "endpoint", "reason"],
            registry=registry,
        )
        self.endpoint_in_flight = LoopGauge(
            "duoserve_endpoint_requests_in_flight",
            "Calls to one replica in flight now.",
            ["backend", "endpoint"],
            registry=registry,
        )
        self.endpoint_up = LoopGauge(
            "duoserve_endpoint_up",
            "1 while a replica is in rotation, 0 while it is ejected as an outlier.",
            ["backend", "endpoint"],
            registry=registry,
        )
        self.endpoint_ejections = LoopCounter(
            "duoserve_endpoint_ejections",
            "Times a replica was ejected after failing calls in a row.",
            ["backend", "endpoint"],
            registry=registry,
        )
        self.backend_endpoints = LoopGauge(
            "duoserve_backend_endpoints",
            "Replicas of a backend by state: active, ejected, draining.",
            ["backend", "state"],
            registry=registry,
        )
        self.endpoint_resolutions = LoopCounter(
            "duoserve_endpoint_resolutions",
            "Resolutions of a backend's host names by result: ok, empty, error (the last two "
            "keep the last good set of replicas).",
            ["backend", "result"],
            registry=registry,
        )

        # Tracing (duoserve/tracing.py), when an OTLP endpoint is set.
        self.trace_spans_exported = LoopCounter(
            "duoserve_trace_spans_exported",
            "Spans delivered to the OTLP collector.",
            [],
            registry=registry,
        )
        self.trace_spans_dropped = LoopCounter(
            "duoserve_trace_spans_dropped",
            "Spans never delivered: queue_full (the export queue was full: the collector is slow "
            "or down), export_failed (the collector did not take the batch in time).",
            ["reason"],
            registry=registry,
        )

        self.config_reloads = LoopCounter(
            "duoserve_config_reloads",
            "Reloads of models.yaml by result: ok, error (the file was refused; the previous "
            "configuration keeps serving), unchanged.",
            ["result"],
            registry=registry,
        )
        self.config_refused = LoopGauge(
            "duoserve_config_refused",
            "1 while the models.yaml on disk is refused (the last good one serves on).",
            [],
            registry=registry,
        )
        self.config_info = LoopGauge(
            "duoserve_config_info",
            "1 for the models.yaml this replica serves, by the first 12 hex digits of its SHA-256.",
            ["hash"],
            registry=registry,
        )
        # Rollouts (duoserve/rollout.py): what the gates read, and where each rollout stands.
        # Label rollout = a hash of the model's rollout block, so replicas find each other's
        # series and a new block starts afresh.
        keyed = ["model", "rollout"]
        self.rollout_calls = LoopCounter(
            "duoserve_rollout_calls",
            "Calls to the rollout's target (side=target, user requests and copies) and to the "
            "routes it replaces (side=current), by outcome (error: 5xx or timeout).",
            [*keyed, "side", "outcome"],
            registry=registry,
        )
        self.rollout_call_duration = LoopHistogram(
            "duoserve_rollout_call_duration_seconds",
            "Backend time of successful calls to the target and to the current routes.",
            [*keyed, "side"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rollout_compared_items = LoopCounter(
            "duoserve_rollout_compared_items",
            "Rows answered by both the target and a current route (copies to the target).",
            keyed,
            registry=registry,
        )
        self.rollout_disagreeing_items = LoopCounter(
            "duoserve_rollout_disagreeing_items",
            "Compared rows whose argmax differed between the target and the current route.",
            keyed,
            registry=registry,
        )
        self.rollout_diff_exceeded = LoopCounter(
            "duoserve_rollout_diff_exceeded",
            "Compared requests whose largest absolute difference exceeded the max_abs_diff gate.",
            keyed,
            registry=registry,
        )
        self.rollout_phase = LoopGauge(
            "duoserve_rollout_phase",
            "1 for the phase a rollout is in: pending, shadow, step, done, rolled_back.",
            [*keyed, "phase"],
            registry=registry,
        )
        self.rollout_step = LoopGauge(
            "duoserve_rollout_step",
            "Step a rollout is at: 0 before the first, 1..n, n+1 once done.",
            keyed,
            registry=registry,
        )
        self.rollout_phase_started = LoopGauge(
            "duoserve_rollout_phase_started_seconds",
            "Unix time the rollout's current phase began.",
            keyed,
            registry=registry,
        )
        self.rollout_target_weight = LoopGauge(
            "duoserve_rollout_target_weight_ratio",
            "Share of the model's requests the rollout's target serves now.",
            keyed,
            registry=registry,
        )
        self.rollout_rolled_back = LoopGauge(
            "duoserve_rollout_rolled_back",
            "1 once a rollout was rolled back (the target gets no traffic until its block "
            "changes).",
            keyed,
            registry=registry,
        )
        self.rollout_gate_value = LoopGauge(
            "duoserve_rollout_gate_value",
            "Each gate's last value (target calls, error ratio, p99 ratio, agreement, answers "
            "beyond max_abs_diff).",
            [*keyed, "gate"],
            registry=registry,
        )
        self.rollout_gate_threshold = LoopGauge(
            "duoserve_rollout_gate_threshold",
            "Each gate's threshold, beside its value.",
            [*keyed, "gate"],
            registry=registry,
        )
        self.rollout_decisions = LoopCounter(
            "duoserve_rollout_decisions",
            "Rollout decisions: advance, done, rollback, join (a replica joining one under way).",
            ["model", "decision"],
            registry=registry,
        )

    def rollout_metrics(self) -> list[LoopMetric]:
        """The rollout series keyed by (model, rollout)."""
        return [
            self.rollout_calls,
            self.rollout_call_duration,
            self.rollout_compared_items,
            self.rollout_disagreeing_items,
            self.rollout_diff_exceeded,
            self.rollout_phase,
            self.rollout_step,
            self.rollout_phase_started,
            self.rollout_target_weight,
            self.rollout_rolled_back,
            self.rollout_gate_value,
            self.rollout_gate_threshold,
        ]

    def forget_backend(self, backend: str) -> None:
        """Drop the series of a backend a reload removed from the configuration."""
        self.circuit_state.remove(backend)
        self.backend_up.remove(backend)
        self.backend_endpoints.remove(backend)
        self.backend_batch_rows.remove(backend)
        for metric in (
            self.endpoint_requests,
            self.endpoint_failures,
            self.endpoint_in_flight,
            self.endpoint_up,
            self.endpoint_ejections,
            self.endpoint_resolutions,
        ):
            metric.remove(backend)

    def forget_endpoint(self, backend: str, endpoint: str) -> None:
        """Drop a replica's series once it has left."""
        for metric in (
            self.endpoint_requests,
            self.endpoint_failures,
            self.endpoint_in_flight,
            self.endpoint_up,
            self.endpoint_ejections,
        ):
            metric.remove(backend, endpoint)

    def set_circuit(self, backend: str, state: str) -> None:
        self.circuit_state.labels(backend).set(CIRCUIT_STATES[state])
