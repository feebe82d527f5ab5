"""Every Prometheus metric the gateway exports, on a registry passed in.

Names and labels are a contract with deploy/prometheus (recording and alert rules) and
deploy/grafana (dashboards): change them together. Label values are low-cardinality: model,
framework, backend, protocol, code, reason. Health and metrics requests are never counted.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
DIFF_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    """The gateway's metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "duoserve_requests",
            "Inference requests answered by the gateway, by who served them and the HTTP status.",
            ["model", "framework", "backend", "protocol", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "duoserve_request_duration_seconds",
            "Time from request received to response ready, whole gateway.",
            ["model", "framework", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backend_duration = Histogram(
            "duoserve_backend_request_duration_seconds",
            "Time spent waiting on the backend for one successful call.",
            ["model", "framework", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "duoserve_requests_in_flight",
            "Inference requests being handled by the gateway now.",
            ["protocol"],
            registry=registry,
        )
        self.backend_in_flight = Gauge(
            "duoserve_backend_requests_in_flight",
            "Calls to a backend in flight now (the per-framework load signal for autoscaling).",
            ["backend", "framework"],
            registry=registry,
        )
        self.items = Counter(
            "duoserve_inferred_items",
            "Rows (first dimension of the first input) inferred successfully.",
            ["model", "framework"],
            registry=registry,
        )
        self.request_size = Histogram(
            "duoserve_request_size_bytes",
            "Size of inference request bodies.",
            ["protocol"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.response_size = Histogram(
            "duoserve_response_size_bytes",
            "Size of inference response bodies.",
            ["protocol"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.backend_up = Gauge(
            "duoserve_backend_up",
            "1 when the backend answered its last readiness probe, else 0.",
            ["backend", "framework"],
            registry=registry,
        )
        self.backend_errors = Counter(
            "duoserve_backend_errors",
            "Failed backend calls by reason (timeout, backend_down, overloaded, ...).",
            ["model", "backend", "framework", "reason"],
            registry=registry,
        )
        self.shed = Counter(
            "duoserve_shed_requests",
            "Requests refused before any work: concurrency limit, rate limit, draining.",
            ["model", "reason"],
            registry=registry,
        )
        self.retries = Counter(
            "duoserve_retries",
            "Backend calls retried because the backend had not processed them.",
            ["backend", "reason"],
            registry=registry,
        )
        self.failovers = Counter(
            "duoserve_failovers",
            "Requests served by another route after the first failed; framework: who served.",
            ["model", "framework"],
            registry=registry,
        )
        self.circuit_state = Gauge(
            "duoserve_circuit_state",
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
            ["backend"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "duoserve_shadow_requests",
            "Shadow copies sent, by the shadow's framework and outcome (code).",
            ["model", "framework", "code"],
            registry=registry,
        )
        self.shadow_disagreements = Counter(
            "duoserve_shadow_disagreements",
            "Shadow answers whose argmax differed from the primary's for at least one row.",
            ["model", "framework"],
            registry=registry,
        )
        self.shadow_compared_items = Counter(
            "duoserve_shadow_compared_items",
            "Rows compared between primary and shadow.",
            ["model", "framework"],
            registry=registry,
        )
        self.shadow_disagreeing_items = Counter(
            "duoserve_shadow_disagreeing_items",
            "Rows whose argmax differed between primary and shadow.",
            ["model", "framework"],
            registry=registry,
        )
        self.shadow_max_abs_diff = Histogram(
            "duoserve_shadow_max_abs_diff",
            "Largest absolute difference between primary and shadow outputs, per request.",
            ["model", "framework"],
            buckets=DIFF_BUCKETS,
            registry=registry,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: label values come from the config and small
        fixed sets, and the lookup (validation, a lock, a dict) is on every request's path."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_circuit(self, backend: str, state: str) -> None:
        self.circuit_state.labels(backend).set(CIRCUIT_STATES[state])
