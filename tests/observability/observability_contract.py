"""What the dashboards and rules query, and who exports each metric they name.

Shared by the observability tests: the static ones (every name is exported by something) and
the live ones (every query returns data from a real Prometheus scraping real servers).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from duoserve.metrics import LoopMetric, Metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
RULE_FILES = tuple(sorted((PROMETHEUS_DIR / "rules").glob("*.yml")))
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
FRAMEWORKS = frozenset({"pytorch", "tensorflow"})

# The scrape job that feeds each metric source (deploy/prometheus/prometheus.yml).
JOB_OF_SOURCE = {
    "gateway": "duoserve-gateway",
    "torchserve": "torchserve",
    "tfserving": "tfserving",
    "dcgm": "dcgm",
}

# TF Serving's names: tensorflow/serving tensorflow_serving/servables/tensorflow/util.cc and
# tensorflow_serving/batching/batching_session.cc define "/tensorflow/serving/..." metrics;
# tensorflow_serving/util/prometheus_exporter.cc turns "/" into ":" and writes samplers as
# histograms (_bucket{le}, _sum, _count). Latencies are in microseconds.
_TFSERVING_HISTOGRAMS = (
    ":tensorflow:serving:request_latency",  # model_name, API, entrypoint
    ":tensorflow:serving:runtime_latency",  # model_name, API, runtime
    ":tensorflow:serving:batching_session:queuing_latency",  # thread_pool_name
)
TFSERVING_METRICS = frozenset(
    {":tensorflow:serving:request_count"}  # model_name, status
    | {f"{h}{suffix}" for h in _TFSERVING_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

TFSERVING_LABELS = {
    ":tensorflow:serving:request_count": frozenset({"model_name", "status"}),
    ":tensorflow:serving:request_latency_bucket": frozenset(
        {"model_name", "API", "entrypoint", "le"}
    ),
    ":tensorflow:serving:runtime_latency_bucket": frozenset({"model_name", "API", "runtime", "le"}),
    ":tensorflow:serving:batching_session:queuing_latency_bucket": frozenset(
        {"thread_pool_name", "le"}
    ),
}

# NVIDIA dcgm-exporter's default counters (labels gpu, UUID, device, modelName, Hostname).
DCGM_METRICS = frozenset(
    {
        "DCGM_FI_DEV_GPU_UTIL",  # percent
        "DCGM_FI_DEV_FB_USED",  # MiB
        "DCGM_FI_DEV_FB_FREE",  # MiB
        "DCGM_FI_DEV_POWER_USAGE",  # W
    }
)

PROMETHEUS_METRICS = frozenset({"up"})

# Gateway metrics that have no series until their event happens (a backend error, a shed
# request, a shadow copy, ...): a live check with only healthy traffic cannot expect them.
# Series of the replicas of remote backends: none while a gateway serves only embedded models
# (failures, ejections and resolutions not even with remote ones until such an event happens).
REPLICA_METRICS = frozenset(
    {
        "duoserve_endpoint_requests_total",
        "duoserve_endpoint_requests_in_flight",
        "duoserve_endpoint_up",
        "duoserve_backend_endpoints",
        "duoserve_endpoint_failures_total",
        "duoserve_endpoint_ejections_total",
        "duoserve_endpoint_resolutions_total",
    }
)
# Series of rollouts and reloads: none until a model has a rollout or the file was reloaded.
ROLLOUT_METRICS = frozenset(
    {
        "duoserve_rollout_target_weight_ratio",
        "duoserve_rollout_gate_value",
        "duoserve_rollout_gate_threshold",
        "duoserve_config_reloads_total",
    }
)
EVENT_DRIVEN_GATEWAY_METRICS = REPLICA_METRICS | ROLLOUT_METRICS | frozenset(
    {
        "duoserve_backend_errors_total",
        "duoserve_shed_requests_total",
        "duoserve_retries_total",
        "duoserve_failovers_total",
        "duoserve_shadow_requests_total",
        "duoserve_shadow_disagreements_total",
        "duoserve_shadow_compared_items_total",
        "duoserve_shadow_disagreeing_items_total",
        "duoserve_shadow_max_abs_diff_bucket",
        "duoserve_shadow_max_abs_diff_count",
        "duoserve_shadow_max_abs_diff_sum",
        # Only for backends with coalesce set in models.yaml.
        "duoserve_backend_batch_rows_bucket",
        "duoserve_backend_batch_rows_count",
        "duoserve_backend_batch_rows_sum",
    }
)

# Values a test gives Grafana's variables: "all" for the template variables (their allValue),
# and a rate window that spans enough 1 s scrapes.
TEST_VARIABLES = {
    "$__rate_interval": "1m",
    "$server_model": ".*",
    "$model": ".*",
    "$framework": ".*",
}


@cache
def gateway_metrics() -> dict[str, frozenset[str]]:
    """Every series name the gateway exports, with its labels, from a fresh Metrics()."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    labels_of = {
        m.name: frozenset(m.labelnames) for m in vars(metrics).values() if isinstance(m, LoopMetric)
    }
    names: dict[str, frozenset[str]] = {}
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    for family in registry.collect():
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = labels_of[family.name] | extra
    return names


@cache
def torchserve_metric_labels() -> dict[str, frozenset[str]]:
    """TorchServe 0.12's names and labels, from the installed package's own metrics.yaml.

    With metrics_mode=prometheus the frontend registers each configured metric under its
    configured name, its dimensions as labels; its bundled simpleclient predates the automatic
    _total suffix, so counters are exposed exactly as named (ts_inference_requests_total,
    Requests2XX, ...). Model metrics get a Hostname dimension added by the backend.
    """
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchserve is not installed: pip install torchserve==0.12.0")
    config_path = Path(next(iter(spec.submodule_search_locations))) / "configs" / "metrics.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    names: dict[str, frozenset[str]] = {}
    for section in ("ts_metrics", "model_metrics"):
        extra = {"Hostname"} if section == "model_metrics" else set()
        for metrics in (config.get(section) or {}).values():
            for metric in metrics:
                names[metric["name"]] = frozenset(metric.get("dimensions", ())) | extra
    return names


def torchserve_metrics() -> frozenset[str]:
    return frozenset(torchserve_metric_labels())


def external_sources() -> dict[str, frozenset[str]]:
    return {
        "torchserve": torchserve_metrics(),
        "tfserving": TFSERVING_METRICS,
        "dcgm": DCGM_METRICS,
        "prometheus": PROMETHEUS_METRICS,
    }


# --- rules -------------------------------------------------------------------------------


@cache
def _all_rules() -> tuple[dict[str, Any], ...]:
    """Every rule of the rule files, parsed once (panel checks look rules up many times)."""
    return tuple(
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    )


def _rules(kind: str) -> dict[str, str]:
    return {rule[kind]: " ".join(rule["expr"].split()) for rule in _all_rules() if kind in rule}


def recording_rules() -> dict[str, str]:
    """record name -> expression."""
    return _rules("record")


def alert_rules() -> dict[str, str]:
    """alert name -> expression."""
    return _rules("alert")


def alert_rule_bodies() -> list[dict[str, Any]]:
    return [copy.deepcopy(rule) for rule in _all_rules() if "alert" in rule]


# --- PromQL --------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset", "inf", "nan", "Inf", "NaN"}
)
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name not in _KEYWORDS:
            names.add(name)
    return names


def selector_labels(expr: str) -> dict[str, set[str]]:
    """metric name -> label names its selectors match on."""
    text = _STRING.sub('""', expr)
    found: dict[str, set[str]] = {}
    for name, matchers in _SELECTOR.findall(text):
        found.setdefault(name, set()).update(_MATCHER_LABEL.findall(matchers))
    return found


def substitute(expr: str, values: dict[str, str] = TEST_VARIABLES) -> str:
    """Replace Grafana variables, longest name first ($__rate_interval before $model)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    return expr


def sources_of(name: str, _seen: frozenset[str] = frozenset()) -> set[str]:
    """Who exports `name`: gateway, torchserve, tfserving, dcgm, prometheus; recording rules
    resolve to the sources of their own expression. Empty: nobody (a typo, a renamed metric).
    """
    if name in gateway_metrics():
        return {"gateway"}
    for source, names in external_sources().items():
        if name in names:
            return {source}
    rules = recording_rules()
    if name in rules and name not in _seen:
        found: set[str] = set()
        for inner in metric_names(rules[name]):
            inner_sources = sources_of(inner, _seen | {name})
            if not inner_sources:
                return set()
            found |= inner_sources
        return found
    return set()


def raw_names(name: str) -> set[str]:
    """The exported series a name stands for: itself, or a recording rule's inputs."""
    rules = recording_rules()
    if name in rules:
        return {raw for inner in metric_names(rules[name]) for raw in raw_names(inner)}
    return {name}


def unknown_names(expr: str) -> set[str]:
    """Names in `expr` that nothing exports."""
    return {name for name in metric_names(expr) if not sources_of(name)}


def wrong_labels(expr: str) -> list[str]:
    """Selectors matching on a label the series does not have (which would match nothing)."""
    problems = []
    rules = recording_rules()
    for name, labels in selector_labels(expr).items():
        if name in gateway_metrics():
            known = gateway_metrics()[name]
        elif name in rules:
            known = frozenset({"framework", "model"})  # every rule is level framework_model
        elif name in torchserve_metric_labels():
            known = torchserve_metric_labels()[name]
        elif name in TFSERVING_LABELS:
            known = TFSERVING_LABELS[name]
        else:
            continue
        problems += [f"{name} has no label {label!r}" for label in sorted(labels - known)]
    return problems


# --- dashboards ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} | {self.panel} | {self.ref_id}"


def load_generator() -> ModuleType:
    """deploy/grafana/generate.py as a module (it is a script, not part of a package)."""
    path = GRAFANA_DIR / "generate.py"
    spec = importlib.util.spec_from_file_location("duoserve_dashboard_generator", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def committed_dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every non-row panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(dashboards: Iterable[dict[str, Any]]) -> list[PanelQuery]:
    return [
        PanelQuery(dashboard["uid"], panel["title"], target["refId"], target["expr"])
        for dashboard in dashboards
        for panel in panels(dashboard)
        for target in panel["targets"]
    ]


_LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?([A-Za-z_][A-Za-z0-9_]*)\)$")


def variable_selectors(dashboard: dict[str, Any]) -> dict[str, str]:
    """variable name -> the series selector of its label_values() query."""
    selectors = {}
    for variable in dashboard["templating"]["list"]:
        match = _LABEL_VALUES.match(variable["definition"].strip())
        if match is None:
            raise ValueError(f"variable {variable['name']}: not label_values(): {variable}")
        selectors[variable["name"]] = match.group(1) or ""
    return selectors


# --- live checks against a real Prometheus ---------------------------------------------------

# Panels fed by each non-gateway source, by title: a live check that does not scrape that
# source must leave exactly these unchecked (so no gateway panel escapes unnoticed).
PANELS_OF_SOURCE = {
    "torchserve": frozenset(
        {
            "TorchServe queue and inference time per request",
            "TorchServe prediction and queue time (last request)",
            "TorchServe responses by status class",
        }
    ),
    "tfserving": frozenset(
        {
            "TF Serving request latency p50 / p99",
            "TF Serving batching queue latency p50 / p99",
            "TF Serving requests by status",
        }
    ),
    "dcgm": frozenset({"GPU utilisation per node", "GPU memory used per node"}),
}


@dataclass
class LiveReport:
    """What a live check did with each query: checked, left unchecked, or found wanting."""

    checked: list[str]
    unchecked: dict[str, set[str]]
    """query -> the sources it needs that were not scraped."""
    no_events_yet: dict[str, set[str]]
    """query -> event-driven metrics with no series yet (no error, shed, shadow happened)."""
    failures: list[str]

    def summary(self) -> str:
        lines = [f"checked ({len(self.checked)}):", *(f"  {q}" for q in self.checked)]
        lines.append(f"not checked, source not scraped ({len(self.unchecked)}):")
        lines += [f"  {q}  [{', '.join(sorted(s))}]" for q, s in sorted(self.unchecked.items())]
        lines.append(f"not checked, no such event yet ({len(self.no_events_yet)}):")
        lines += [f"  {q}  [{', '.join(sorted(s))}]" for q, s in sorted(self.no_events_yet.items())]
        return "\n".join(lines)


def check_live(
    prom: Any,
    queries: Iterable[tuple[str, str]],
    scraped_sources: frozenset[str],
    may_be_absent: frozenset[str] = EVENT_DRIVEN_GATEWAY_METRICS,
    frameworks: frozenset[str] = FRAMEWORKS,
) -> LiveReport:
    """Run each (label, expr) on `prom` (a PrometheusHandle) and say whether it has data.

    A query is checked when every source it reads is scraped. It must then return data, with
    a finite value for every framework in `frameworks` when it is about frameworks, unless a
    series it reads does not exist in Prometheus at all and is listed in `may_be_absent`.
    """
    report = LiveReport([], {}, {}, [])
    present = set(prom.api("label/__name__/values"))
    for label, expr in queries:
        names = metric_names(expr)
        sources = {s for name in names for s in sources_of(name)}
        if not sources:
            report.failures.append(f"{label}: reads no known metric: {expr}")
            continue
        if not sources <= scraped_sources:
            report.unchecked[label] = sources - scraped_sources
            continue
        raw = {r for name in names for r in raw_names(name)}
        missing = raw - present
        if missing:
            if missing <= may_be_absent:
                report.no_events_yet[label] = missing
            else:
                report.failures.append(f"{label}: Prometheus has no series {sorted(missing)}")
            continue
        result = prom.query(substitute(expr))
        finite = [r for r in result if r["value"][1] not in ("NaN", "+Inf", "-Inf")]
        if not finite:
            report.failures.append(f"{label}: no data ({len(result)} non-finite): {expr}")
            continue
        if "framework" in expr:
            seen = {r["metric"].get("framework") for r in finite}
            if not frameworks <= seen:
                report.failures.append(
                    f"{label}: data for {sorted(map(str, seen))}, not all of "
                    f"{sorted(frameworks)}: {expr}"
                )
                continue
        report.checked.append(label)
    return report
