"""Generate DuoServe's Grafana dashboards (deploy/grafana/dashboards/*.json).

The JSON is committed and provisioned as-is; this file is its source. Output is
deterministic (sorted keys, fixed ids and layout), so `--check` can tell a stale copy.

    python deploy/grafana/generate.py            # rewrite the JSON files
    python deploy/grafana/generate.py --check    # exit 1 when a committed file differs

Every panel and target names the provisioned datasource by uid (see
provisioning/datasources/prometheus.yml). Metric names are a contract with
services/gateway/duoserve/metrics.py and deploy/prometheus/rules; tests/observability checks
that every name used here is exported by something.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "prometheus"}
OUT_DIR = Path(__file__).resolve().parent / "dashboards"

# Grafana substitutes these; the tests substitute them too (see tests/observability).
MODEL = 'model=~"$model"'
FRAMEWORK = 'framework=~"$framework"'
RATE = "$__rate_interval"

PANEL_HEIGHT = 8
EXEMPLAR_SERIES = "traced request"
"""The legend's last words of a query read for its exemplars (its line is hidden)."""
GRID_WIDTH = 24


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel and the legend Grafana draws for each of its series."""

    expr: str
    legend: str
    exemplars: bool = False
    """Grafana also asks Prometheus for the exemplars of the series this reads (the gateway's
    latency buckets carry the trace id of a sampled request) and draws them as points that
    link a spike to its trace; the query's own line is hidden (it repeats a recorded one), so
    its legend must end in EXEMPLAR_SERIES."""


@dataclass(frozen=True)
class Panel:
    """A panel before layout: what it shows and how its values read."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    mappings: tuple[tuple[int, str, str], ...] = ()
    """(value, text, colour) for panels showing a state rather than a quantity."""
    width: int = 12
    stack: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def _selector(*matchers: str) -> str:
    return "{" + ",".join(matchers) + "}"


def _quantile(q: float, bucket: str, by: str, matchers: str = "", scale: str = "") -> str:
    """histogram_quantile over a rated bucket series; scale converts e.g. microseconds."""
    expr = f"histogram_quantile({q}, sum by ({by}, le) (rate({bucket}{matchers}[{RATE}])))"
    return f"{expr}{scale}"


def _state_mappings(mappings: tuple[tuple[int, str, str], ...]) -> list[dict[str, Any]]:
    options = {
        str(value): {"color": colour, "index": index, "text": text}
        for index, (value, text, colour) in enumerate(mappings)
    }
    return [{"type": "value", "options": options}] if options else []


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend,
            "range": True,
            "refId": chr(ord("A") + index),
            **({"exemplar": True} if query.exemplars else {}),
        }
        for index, query in enumerate(panel.queries)
    ]
    # A query there for its exemplars draws no line of its own: its series are matched by
    # their legend (a match on the query's refId would hide its exemplars too).
    overrides = [
        {
            "matcher": {"id": "byRegexp", "options": f".* {EXEMPLAR_SERIES}$"},
            "properties": [
                {
                    "id": "custom.hideFrom",
                    "value": {"legend": True, "tooltip": True, "viz": True},
                }
            ],
        }
        for index, query in enumerate(panel.queries)
        if query.exemplars
    ]
    defaults: dict[str, Any] = {"unit": panel.unit, "mappings": _state_mappings(panel.mappings)}
    options: dict[str, Any]
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 10 if panel.stack else 0,
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if panel.stack else "none"},
        }
        options = {
            "legend": {"calcs": ["mean", "max"], "displayMode": "table", "placement": "bottom"},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "state-timeline":
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
        options = {"legend": {"displayMode": "list", "placement": "bottom"}, "showValue": "auto"}
    else:
        raise ValueError(f"unknown panel kind {panel.kind!r}")
    return {
        "datasource": DATASOURCE,
        "description": panel.description,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y},
        "id": panel_id,
        "options": options,
        "targets": targets,
        "title": panel.title,
        "type": panel.kind,
    }


def _layout(rows: tuple[Row, ...]) -> list[dict[str, Any]]:
    """Rows one under another; panels fill each row left to right, wrapping at 24 columns."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in rows:
        panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "id": panel_id,
                "panels": [],
                "title": row.title,
                "type": "row",
            }
        )
        panel_id += 1
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x = 0
                y += PANEL_HEIGHT
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
        y += PANEL_HEIGHT
    return panels


def _variable(name: str, label: str, query: str, *, multi: bool) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "datasource": DATASOURCE,
        "definition": query,
        "includeAll": multi,
        "label": label,
        "multi": multi,
        "name": name,
        "query": {"qryType": 1, "query": query, "refId": f"PrometheusVariableQueryEditor-{name}"},
        "refresh": 2,  # on time range change: new models appear without a reload
        "regex": "",
        "sort": 1,
        "type": "query",
    }
    if multi:
        # ".*" rather than Grafana's default alternation of the values it knows: a model
        # added after the page loaded still shows.
        variable["allValue"] = ".*"
        variable["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    else:
        variable["current"] = {}
    return variable


def _dashboard(
    uid: str, title: str, description: str, rows: tuple[Row, ...], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": False,
        "graphTooltip": 1,  # shared crosshair: compare both frameworks at the same instant
        "links": [
            {
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "tags": ["duoserve"],
                "title": "DuoServe",
                "type": "dashboards",
            }
        ],
        "panels": _layout(rows),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["duoserve"],
        "templating": {"list": variables},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
    }


def _latency_panels(model: str, framework: str, width: int = 12) -> tuple[Panel, ...]:
    sel = _selector(model, framework)
    gateway = tuple(
        Query(
            f"framework_model:duoserve_request_duration_seconds:{p}_rate1m{sel}",
            f"{{{{framework}}}} {{{{model}}}} {p}",
        )
        for p in ("p50", "p95", "p99")
    )
    backend = tuple(
        Query(
            f"framework_model:duoserve_backend_request_duration_seconds:{p}_rate1m{sel}",
            f"{{{{framework}}}} {{{{model}}}} {p}",
        )
        for p in ("p50", "p95", "p99")
    )
    # Recorded series have no exemplars: the raw buckets are read for them (line hidden).
    exemplars, by = f"{{{{framework}}}} {{{{model}}}} {EXEMPLAR_SERIES}", "framework, model"
    return (
        Panel(
            "Request latency p50 / p95 / p99 (whole gateway)",
            "Time from request received to response ready, per framework and model: what a "
            "client sees. Recording rules over duoserve_request_duration_seconds. The points "
            "are exemplars: a traced request's latency and its trace id (tracing on).",
            (
                *gateway,
                Query(
                    _quantile(0.99, "duoserve_request_duration_seconds_bucket", by, sel),
                    exemplars,
                    exemplars=True,
                ),
            ),
            unit="s",
            width=width,
        ),
        Panel(
            "Backend latency p50 / p95 / p99",
            "Time waiting on TorchServe, TF Serving or the in-process runtime. The gap to the "
            "whole-gateway latency is the gateway's own overhead (decode, route, encode). The "
            "points are exemplars: a traced request's backend call and its trace id.",
            (
                *backend,
                Query(
                    _quantile(0.99, "duoserve_backend_request_duration_seconds_bucket", by, sel),
                    exemplars,
                    exemplars=True,
                ),
            ),
            unit="s",
            width=width,
        ),
    )


def _throughput_panels(model: str, framework: str) -> tuple[Panel, ...]:
    sel = _selector(model, framework)
    return (
        Panel(
            "Requests per second",
            "Inference requests answered, any status, per framework and model.",
            (
                Query(
                    f"framework_model:duoserve_requests:rate1m{sel}",
                    "{{framework}} {{model}}",
                ),
            ),
            unit="reqps",
            width=8,
        ),
        Panel(
            "Items per second",
            "Rows inferred successfully (a batch of 32 counts 32): the samples/s figure the "
            "benchmarks report.",
            (
                Query(
                    f"framework_model:duoserve_inferred_items:rate1m{sel}",
                    "{{framework}} {{model}}",
                ),
            ),
            unit="short",
            width=8,
        ),
        Panel(
            "Responses by status code",
            "Requests per second by HTTP status: 4xx are the client's mistakes, 5xx ours.",
            (
                Query(
                    f"sum by (framework, code) (rate(duoserve_requests_total{sel}[{RATE}]))",
                    "{{framework}} {{code}}",
                ),
            ),
            unit="reqps",
            width=8,
            stack=True,
        ),
    )


def _error_ratio_panel(model: str, framework: str) -> Panel:
    sel = _selector(model, framework)
    return Panel(
        "Error ratio (5xx share of requests)",
        "Share of requests answered with a 5xx status. DuoServeErrorRatioHigh fires above "
        "1 % for 5 minutes.",
        (
            Query(
                f"framework_model:duoserve_request_errors:ratio_rate1m{sel}",
                "{{framework}} {{model}}",
            ),
        ),
        unit="percentunit",
    )


def _backend_error_reason_panel(framework: str) -> Panel:
    # The gateway observes the backend duration only for calls that succeeded: attempts are
    # successes plus failures.
    errors = f"rate(duoserve_backend_errors_total{_selector(MODEL, framework)}[{RATE}])"
    successes = (
        "rate(duoserve_backend_request_duration_seconds_count"
        f"{_selector(MODEL, framework)}[{RATE}])"
    )
    return Panel(
        "Backend error ratio by reason",
        "Failed backend call attempts per attempt, by reason (timeout, backend_down, "
        "overloaded, circuit_open, backend_error, ...): says why the error ratio moved.",
        (
            Query(
                f"sum by (framework, reason) ({errors}) / ignoring (reason) group_left ()"
                f" (sum by (framework) ({successes}) + sum by (framework) ({errors}))",
                "{{framework}} {{reason}}",
            ),
        ),
        unit="percentunit",
    )


def _torchserve_per_request(counter: str) -> str:
    """Average microseconds per request of a cumulative TorchServe counter, in seconds."""
    sel = '{model_name=~"$server_model"}'
    return (
        f"sum by (model_name) (rate({counter}{sel}[{RATE}]))"
        f" / sum by (model_name) (rate(ts_inference_requests_total{sel}[{RATE}])) / 1e6"
    )


def _overview_rows() -> tuple[Row, ...]:
    any_framework = _selector(FRAMEWORK)
    return (
        Row("Latency per framework", _latency_panels(MODEL, FRAMEWORK)),
        Row("Throughput", _throughput_panels(MODEL, FRAMEWORK)),
        Row(
            "Errors", (_error_ratio_panel(MODEL, FRAMEWORK), _backend_error_reason_panel(FRAMEWORK))
        ),
        Row(
            "Load: in flight and shed",
            (
                Panel(
                    "Requests in flight (gateway)",
                    "Inference requests the gateway is handling now, by client protocol.",
                    (
                        Query(
                            "sum by (protocol) (duoserve_requests_in_flight)",
                            "{{protocol}}",
                        ),
                    ),
                    width=8,
                ),
                Panel(
                    "Backend calls in flight",
                    "Calls waiting on each backend now: the per-framework load signal the "
                    "autoscaler uses.",
                    (
                        Query(
                            f"sum by (backend, framework) "
                            f"(duoserve_backend_requests_in_flight{any_framework})",
                            "{{framework}} {{backend}}",
                        ),
                    ),
                    width=8,
                ),
                Panel(
                    "Shed requests per second",
                    "Requests refused before any work (concurrency limit, rate limit, "
                    "draining), by reason. Non-zero means the gateway or a backend is at "
                    "capacity: scale out.",
                    (
                        Query(
                            f"sum by (model, reason) "
                            f"(rate(duoserve_shed_requests_total{_selector(MODEL)}[{RATE}]))",
                            "{{model}} {{reason}}",
                        ),
                    ),
                    unit="reqps",
                    width=8,
                ),
                Panel(
                    "Retries and failovers per second",
                    "Backend calls retried (the backend had not processed them), and requests "
                    "served by another route after their first route failed.",
                    (
                        Query(
                            f"sum by (backend, reason) (rate(duoserve_retries_total[{RATE}]))",
                            "retry {{backend}} {{reason}}",
                        ),
                        Query(
                            f"sum by (model, framework) "
                            f"(rate(duoserve_failovers_total{_selector(MODEL, FRAMEWORK)}"
                            f"[{RATE}]))",
                            "failover to {{framework}} {{model}}",
                        ),
                    ),
                    unit="reqps",
                ),
                Panel(
                    "Request and response size p95",
                    "Body sizes by client protocol; large bodies point at clients that "
                    "should batch less or use the binary tensor extension.",
                    (
                        Query(
                            _quantile(0.95, "duoserve_request_size_bytes_bucket", "protocol"),
                            "request {{protocol}}",
                        ),
                        Query(
                            _quantile(0.95, "duoserve_response_size_bytes_bucket", "protocol"),
                            "response {{protocol}}",
                        ),
                    ),
                    unit="bytes",
                ),
            ),
        ),
        Row(
            "Backend health",
            (
                Panel(
                    "Backend up",
                    "The gateway's readiness probe of each backend. DuoServeBackendDown fires "
                    "after a minute down.",
                    (
                        Query(
                            f"max by (backend, framework) (duoserve_backend_up{any_framework})",
                            "{{framework}} {{backend}}",
                        ),
                    ),
                    kind="state-timeline",
                    mappings=((0, "down", "red"), (1, "up", "green")),
                ),
                Panel(
                    "Circuit breaker state",
                    "Closed: calls flow. Half-open: probing. Open: the gateway stopped calling "
                    "the backend after repeated failures.",
                    (Query("max by (backend) (duoserve_circuit_state)", "{{backend}}"),),
                    kind="state-timeline",
                    mappings=(
                        (0, "closed", "green"),
                        (1, "half-open", "orange"),
                        (2, "open", "red"),
                    ),
                ),
            ),
        ),
        Row(
            "Backend replicas",
            (
                Panel(
                    "Requests per backend replica",
                    "Calls per second the gateway sends to each replica (pod) of each backend. "
                    "Replicas of one backend carry about equal shares; one far below its "
                    "siblings is slow (the gateway steers away from it), warming up after "
                    "joining, or ejected.",
                    (
                        Query(
                            f"sum by (backend, endpoint) "
                            f"(rate(duoserve_endpoint_requests_total[{RATE}]))",
                            "{{backend}} {{endpoint}}",
                        ),
                    ),
                    unit="reqps",
                    width=8,
                ),
                Panel(
                    "Backend replicas by state",
                    "Replicas each backend's name resolves to: active (in rotation), ejected "
                    "after failing calls in a row (DuoServeBackendReplicasEjected after 5 "
                    "minutes), draining (left DNS, finishing their calls).",
                    (
                        Query(
                            "sum by (backend, state) (duoserve_backend_endpoints)",
                            "{{backend}} {{state}}",
                        ),
                    ),
                    stack=True,
                    width=8,
                ),
                Panel(
                    "Replica failures per second",
                    "Failed calls per replica by reason: the failures that count towards "
                    "ejecting it. Failures on one replica only point at that pod.",
                    (
                        Query(
                            f"sum by (backend, endpoint, reason) "
                            f"(rate(duoserve_endpoint_failures_total[{RATE}]))",
                            "{{backend}} {{endpoint}} {{reason}}",
                        ),
                    ),
                    unit="reqps",
                    width=8,
                ),
            ),
        ),
        Row(
            "TorchServe",
            (
                Panel(
                    "TorchServe queue and inference time per request",
                    "Average time a request waited in TorchServe's job queue, and spent in "
                    "inference, from its cumulative counters (metrics_mode=prometheus). Queue "
                    "time growing means too few workers.",
                    (
                        Query(
                            _torchserve_per_request("ts_queue_latency_microseconds"),
                            "queue {{model_name}}",
                        ),
                        Query(
                            _torchserve_per_request("ts_inference_latency_microseconds"),
                            "inference {{model_name}}",
                        ),
                    ),
                    unit="s",
                ),
                Panel(
                    "TorchServe prediction and queue time (last request)",
                    "TorchServe's own gauges, in milliseconds: PredictionTime (the worker's "
                    "call of the handler: preprocess, inference, postprocess) per model, "
                    "QueueTime per host.",
                    (
                        # Not HandlerTime: only handlers built on TorchServe's BaseHandler write
                        # it, and DuoServe's SignatureHandler is not; the worker writes
                        # PredictionTime around every handler.
                        Query(
                            'max by (ModelName) (PredictionTime{ModelName=~"$server_model"})',
                            "prediction {{ModelName}}",
                        ),
                        Query("max by (Hostname) (QueueTime)", "queue {{Hostname}}"),
                    ),
                    unit="ms",
                ),
                Panel(
                    "TorchServe responses by status class",
                    "Responses per second TorchServe itself counted, by status class.",
                    (
                        Query(f"sum(rate(Requests2XX[{RATE}]))", "2xx"),
                        Query(f"sum(rate(Requests4XX[{RATE}]))", "4xx"),
                        Query(f"sum(rate(Requests5XX[{RATE}]))", "5xx"),
                    ),
                    unit="reqps",
                    stack=True,
                ),
            ),
        ),
        Row(
            "TF Serving",
            (
                Panel(
                    "TF Serving request latency p50 / p99",
                    "TF Serving's own request latency histogram (microseconds, shown in "
                    "seconds), per model.",
                    tuple(
                        Query(
                            _quantile(
                                q,
                                ":tensorflow:serving:request_latency_bucket",
                                "model_name",
                                '{model_name=~"$server_model"}',
                                " / 1e6",
                            ),
                            f"{{{{model_name}}}} p{int(q * 100)}",
                        )
                        for q in (0.5, 0.99)
                    ),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "TF Serving batching queue latency p50 / p99",
                    "Time requests wait for a batch to fill (--enable_batching). High when "
                    "batch_timeout_micros is long relative to traffic.",
                    tuple(
                        Query(
                            _quantile(
                                q,
                                ":tensorflow:serving:batching_session:queuing_latency_bucket",
                                "thread_pool_name",
                                scale=" / 1e6",
                            ),
                            # The model server leaves thread_pool_name empty (Prometheus
                            # drops the label), so the legend names the queue itself.
                            f"batching queue p{int(q * 100)}",
                        )
                        for q in (0.5, 0.99)
                    ),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "TF Serving requests by status",
                    "Requests per second TF Serving counted, by model and gRPC status.",
                    (
                        Query(
                            f"sum by (model_name, status) "
                            f'(rate(:tensorflow:serving:request_count{{model_name=~"$server_model"}}'
                            f"[{RATE}]))",
                            "{{model_name}} {{status}}",
                        ),
                    ),
                    unit="reqps",
                    width=8,
                ),
            ),
        ),
        Row(
            "GPU",
            (
                Panel(
                    "GPU utilisation per node",
                    "Share of time a kernel ran on each GPU (DCGM exporter), per node.",
                    (
                        Query(
                            "avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL)",
                            "{{Hostname}} GPU {{gpu}}",
                        ),
                    ),
                    unit="percent",
                ),
                Panel(
                    "GPU memory used per node",
                    "Frame buffer memory in use on each GPU (DCGM exporter, MiB).",
                    (
                        Query(
                            "sum by (Hostname, gpu) (DCGM_FI_DEV_FB_USED)",
                            "{{Hostname}} GPU {{gpu}}",
                        ),
                    ),
                    unit="mbytes",
                ),
            ),
        ),
        Row("Shadow comparison", _shadow_panels(MODEL, FRAMEWORK)),
    )


def _shadow_panels(model: str, framework: str) -> tuple[Panel, ...]:
    sel = _selector(model, framework)
    return (
        Panel(
            "Shadow agreement",
            "Share of compared rows where the shadow framework predicted the same class as "
            "the primary. DuoServeShadowDisagreement fires below 98 %.",
            (
                Query(
                    f"1 - framework_model:duoserve_shadow_disagreeing_items:ratio_rate5m{sel}",
                    "{{framework}} {{model}}",
                ),
            ),
            unit="percentunit",
            width=8,
        ),
        Panel(
            "Shadow output difference p99",
            "Largest absolute difference between primary and shadow outputs per request, "
            "99th percentile: float noise is ~1e-6.",
            (
                Query(
                    _quantile(0.99, "duoserve_shadow_max_abs_diff_bucket", "framework, model", sel),
                    "{{framework}} {{model}}",
                ),
            ),
            width=8,
        ),
        Panel(
            "Shadow requests by outcome",
            "Shadow copies sent per second, by the shadow's framework and status code.",
            (
                Query(
                    f"sum by (framework, code) (rate(duoserve_shadow_requests_total{sel}[{RATE}]))",
                    "{{framework}} {{code}}",
                ),
            ),
            unit="reqps",
            width=8,
        ),
    )


def _rollout_row(model: str) -> Row:
    """Where each rollout stands: the target's share over time, its gates against their
    thresholds, and how models.yaml reloads went (a rollout is started by a reload)."""
    sel = _selector(model)
    return Row(
        "Rollouts and configuration",
        (
            Panel(
                "Rollout: target's share of requests",
                "Share of the model's requests its rollout target serves: 0 in the shadow "
                "phase, each step's percent, 1 when done, back to 0 when rolled back "
                "(DuoServeRolloutRolledBack).",
                (
                    Query(
                        f"max by (model) (duoserve_rollout_target_weight_ratio{sel})",
                        "{{model}}",
                    ),
                ),
                unit="percentunit",
                width=8,
            ),
            Panel(
                "Rollout gates against their thresholds",
                "Each gate's value at the last evaluation beside its threshold: target calls "
                "(min_requests), error ratio, p99 ratio to the current routes, argmax agreement, "
                "answers beyond max_abs_diff.",
                (
                    Query(
                        f"max by (model, gate) (duoserve_rollout_gate_value{sel})",
                        "{{model}} {{gate}}",
                    ),
                    Query(
                        f"max by (model, gate) (duoserve_rollout_gate_threshold{sel})",
                        "{{model}} {{gate}} threshold",
                    ),
                ),
                width=8,
            ),
            Panel(
                "models.yaml reloads",
                "Reloads of models.yaml per result (ok, error: refused, the previous "
                "configuration serves on; unchanged), and the configuration each replica serves "
                "by hash: replicas showing different hashes have not all picked up an edit yet.",
                (
                    Query(
                        f"sum by (result) (increase(duoserve_config_reloads_total[{RATE}]))",
                        "{{result}}",
                    ),
                    Query("count by (hash) (duoserve_config_info)", "replicas on {{hash}}"),
                ),
                width=8,
            ),
        ),
    )


def _model_rows() -> tuple[Row, ...]:
    # One model picked, yet still =~: a plain name is a regex matching itself, and the same
    # selectors serve both dashboards.
    model = MODEL
    sel = _selector(model, FRAMEWORK)
    return (
        Row("Latency", _latency_panels(model, FRAMEWORK)),
        Row("Throughput", _throughput_panels(model, FRAMEWORK)),
        Row(
            "Errors and batching",
            (
                _error_ratio_panel(model, FRAMEWORK),
                Panel(
                    "Average rows per request",
                    "Items per second over requests per second: how much clients batch.",
                    (
                        Query(
                            f"framework_model:duoserve_inferred_items:rate1m{sel}"
                            f" / framework_model:duoserve_requests:rate1m{sel}",
                            "{{framework}}",
                        ),
                    ),
                ),
            ),
        ),
        Row("Shadow comparison", _shadow_panels(model, FRAMEWORK)),
        _rollout_row(model),
    )


def build_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard, by file name."""
    overview = _dashboard(
        "duoserve-overview",
        "DuoServe — PyTorch vs TensorFlow",
        "Latency, throughput, errors and resources of the gateway and both serving "
        "frameworks, side by side.",
        _overview_rows(),
        [
            _variable("model", "Model", "label_values(duoserve_requests_total, model)", multi=True),
            _variable(
                "framework",
                "Framework",
                'label_values(duoserve_requests_total{model=~"$model"}, framework)',
                multi=True,
            ),
            # TorchServe and TF Serving label the backend's model name (a route's `model`),
            # which need not equal the gateway's model name: their rows have their own picker.
            _variable(
                "server_model",
                "Backend model",
                'label_values({__name__=~"ts_inference_requests_total|'
                ':tensorflow:serving:request_count"}, model_name)',
                multi=True,
            ),
        ],
    )
    per_model = _dashboard(
        "duoserve-model",
        "DuoServe — model drill-down",
        "One model: its latency, throughput, errors and shadow agreement per framework.",
        _model_rows(),
        [
            _variable(
                "model", "Model", "label_values(duoserve_requests_total, model)", multi=False
            ),
            _variable(
                "framework",
                "Framework",
                'label_values(duoserve_requests_total{model=~"$model"}, framework)',
                multi=True,
            ),
        ],
    )
    return {"duoserve-overview.json": overview, "duoserve-model.json": per_model}


def render(dashboard: dict[str, Any]) -> str:
    """The committed form: sorted keys, two-space indent, trailing newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if a committed file is stale")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of the JSON files")
    args = parser.parse_args(argv)
    stale = []
    for name, dashboard in build_dashboards().items():
        path = args.out / name
        text = render(dashboard)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            "stale dashboards (run `make dashboards` and commit): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
