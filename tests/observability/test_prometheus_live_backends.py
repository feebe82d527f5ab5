"""The dashboards and rules against Prometheus scraping a gateway, TorchServe and TF Serving.

A gateway process routes `digits` to real TorchServe (PyTorch) and the TF Serving stand-in
(TensorFlow, gRPC, run with --enable_batching as services/tfserving/Dockerfile runs the real
server), and traffic goes through all three front doors. Prometheus scrapes the gateway,
TorchServe's metrics API and the stand-in's /monitoring/prometheus/metrics with the production
rules; then every recording rule and every panel query must return data for both frameworks.
Only the GPU panels stay unchecked: no GPU, so no DCGM exporter, runs here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from backends_stack import (
    FRONT_DOORS,
    MODELS,
    drive_front_doors,
    torchserve_not_found,
    write_backends_config,
)
from live_stack import wait_for
from observability_contract import (
    JOB_OF_SOURCE,
    PANELS_OF_SOURCE,
    ROLLOUT_METRICS,
    RULE_FILES,
    check_live,
    committed_dashboards,
    panel_queries,
    recording_rules,
    substitute,
)

from tests.prometheus_fixture import PrometheusHandle, start_prometheus
from tests.servers import Gateway
from tests.tfserving_standin.fixture import StandinHandle, start_standin

pytestmark = pytest.mark.integration

SCRAPED = frozenset({"gateway", "torchserve", "tfserving"})
TFSERVING_METRICS_PATH = "/monitoring/prometheus/metrics"  # services/tfserving/monitoring.config

# Healthy traffic makes no backend error, shed request, retry or failover in the gateway, and
# no 5xx in TorchServe (which creates Requests5XX at its first server error): these series do
# not exist, and the queries reading them are reported as "no such event yet". The shadow
# metrics are not among them: both single-route models are shadowed.
ABSENT_ON_HEALTHY_TRAFFIC = frozenset(
    {
        "duoserve_backend_errors_total",
        "duoserve_shed_requests_total",
        "duoserve_retries_total",
        "duoserve_failovers_total",
        "Requests5XX",
        # Each backend is one healthy replica here: no replica fails a call.
        "duoserve_endpoint_failures_total",
    }
) | ROLLOUT_METRICS  # no rollout and no reload in this stack


@dataclass
class LiveBackends:
    prom: PrometheusHandle
    served: Counter[tuple[str, str, str, int]]
    """(front door, model, framework that served, status code) -> requests."""
    torchserve_4xx: list[int]


@pytest.fixture(scope="module")
def batching_standin(model_store: Path) -> Iterator[StandinHandle]:
    """The stand-in with --enable_batching, so it exports the batching queue latency that the
    real server does (the session `tfserving` fixture runs without batching)."""
    handle = start_standin(
        model_base_path=model_store / "tensorflow" / "digits", enable_batching=True
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def live(
    torchserve: Any, batching_standin: StandinHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveBackends]:
    """Prometheus after 8 s of traffic to both frameworks through every front door."""
    workdir = tmp_path_factory.mktemp("live-backends")
    config = write_backends_config(workdir / "models.yaml", torchserve, batching_standin)
    gateway = Gateway(config, workdir, env={"DUOSERVE_BACKEND_PROBE_INTERVAL_S": "1"})
    prom: PrometheusHandle | None = None
    try:
        gateway.start(60.0)
        targets = {
            JOB_OF_SOURCE["gateway"]: [gateway.url.removeprefix("http://")],
            JOB_OF_SOURCE["torchserve"]: [torchserve.metrics_target],
            JOB_OF_SOURCE["tfserving"]: (
                batching_standin.rest_url.removeprefix("http://"),
                TFSERVING_METRICS_PATH,
            ),
        }
        prom = start_prometheus(workdir, targets, RULE_FILES)
        prom.wait_for_scrapes(list(targets))
        # One 4xx before and one after the traffic: a rate over both scrapes is above zero.
        not_found = [torchserve_not_found(torchserve)]
        served = drive_front_doors(gateway.url, seconds=8.0)
        not_found.append(torchserve_not_found(torchserve))
        for expr, series in (
            ("framework_model:duoserve_requests:rate1m", 4),
            ("framework_model:duoserve_shadow_disagreeing_items:ratio_rate5m", 2),
            ("sum(rate(ts_inference_requests_total[1m])) > 0", 1),
            ("sum(rate(Requests4XX[1m])) > 0", 1),
            ("sum(rate(:tensorflow:serving:request_count[1m])) > 0", 1),
            ("sum(rate(:tensorflow:serving:batching_session:queuing_latency_count[1m])) > 0", 1),
        ):
            wait_for(prom, expr, series)
        yield LiveBackends(prom, served, not_found)
    finally:
        if prom is not None:
            prom.stop()
        gateway.stop()


def test_both_frameworks_answer_through_every_front_door(live: LiveBackends) -> None:
    codes = {code for (*_, code) in live.served}
    assert codes == {200}, live.served
    for door in FRONT_DOORS:
        frameworks = {
            model: {fw for (d, m, fw, _) in live.served if d == door and m == model}
            for model in MODELS
        }
        assert frameworks == {
            "digits": {"pytorch", "tensorflow"},  # the 50/50 split
            "digits-pytorch": {"pytorch"},
            "digits-tensorflow": {"tensorflow"},
        }, door
    assert live.torchserve_4xx == [404, 404]


def test_each_framework_was_served_by_its_real_server(live: LiveBackends) -> None:
    """The framework label comes from TorchServe and TF Serving, not an in-process runtime."""
    calls = live.prom.query(
        "sum by (backend, framework) "
        "(rate(duoserve_backend_request_duration_seconds_count[1m])) > 0"
    )
    assert {(r["metric"]["backend"], r["metric"]["framework"]) for r in calls} == {
        ("torchserve", "pytorch"),
        ("tfserving", "tensorflow"),
    }
    up = live.prom.query("up")
    assert {r["metric"]["job"]: r["value"][1] for r in up} == {
        JOB_OF_SOURCE[source]: "1" for source in SCRAPED
    }


def test_every_panel_and_rule_has_data_for_both_frameworks(
    live: LiveBackends, record_property: Any
) -> None:
    queries = [(str(q), q.expr) for q in panel_queries(committed_dashboards().values())]
    queries += [(f"rule {name}", name) for name in recording_rules()]
    report = check_live(live.prom, queries, SCRAPED, may_be_absent=ABSENT_ON_HEALTHY_TRAFFIC)
    record_property("live_check", report.summary())
    print(report.summary())  # shown with -rA: which queries were checked, which not, and why
    assert report.failures == []

    # Not checked: exactly the GPU panels, because no DCGM exporter (no GPU) runs here.
    unchecked_panels = {label.split(" | ")[1] for label in report.unchecked}
    assert unchecked_panels == PANELS_OF_SOURCE["dcgm"], "only the GPU panels lack a source"
    assert set().union(*report.unchecked.values()) == {"dcgm"}

    # Every recording rule, and every TorchServe and TF Serving panel, returned data; the
    # one exception is TorchServe's 5xx series, which healthy traffic never creates.
    checked_panels = {label.split(" | ")[1] for label in report.checked if " | " in label}
    backend_panels = PANELS_OF_SOURCE["torchserve"] | PANELS_OF_SOURCE["tfserving"]
    assert backend_panels <= checked_panels
    assert {"Requests per backend replica", "Backend replicas by state"} <= checked_panels
    assert {f"rule {name}" for name in recording_rules()} <= set(report.checked)
    assert set().union(*report.no_events_yet.values()) == ABSENT_ON_HEALTHY_TRAFFIC
    unchecked_backend_queries = {
        label for label in report.no_events_yet if label.split(" | ")[1] in backend_panels
    }
    assert unchecked_backend_queries == {
        "duoserve-overview | TorchServe responses by status class | C"
    }


def _panel_values(prom: PrometheusHandle, panel: str, ref_id: str) -> list[float]:
    """The values a panel query of the overview shows now, variables set to "all"."""
    (query,) = [
        q
        for q in panel_queries(committed_dashboards().values())
        if (q.dashboard, q.panel, q.ref_id) == ("duoserve-overview", panel, ref_id)
    ]
    return [float(r["value"][1]) for r in prom.query(substitute(query.expr))]


def test_server_latencies_read_in_seconds_within_what_the_gateway_waited(
    live: LiveBackends,
) -> None:
    """TorchServe and TF Serving count microseconds; their panels must show seconds that fit
    inside the time the gateway spent waiting on them (a wrong scale is off by 1000)."""
    backend_p99 = {
        r["metric"]["framework"]: float(r["value"][1])
        for r in live.prom.query(
            "max by (framework) "
            "(framework_model:duoserve_backend_request_duration_seconds:p99_rate1m)"
        )
    }
    assert set(backend_p99) == {"pytorch", "tensorflow"}, backend_p99
    readings = {
        ("TorchServe queue and inference time per request", "B"): "pytorch",
        ("TF Serving request latency p50 / p99", "A"): "tensorflow",
    }
    for (panel, ref_id), framework in readings.items():
        values = _panel_values(live.prom, panel, ref_id)
        assert values, panel
        for value in values:
            assert 1e-5 < value <= 2 * backend_p99[framework], (panel, value, backend_p99)
    # Queueing for a free worker (TorchServe) or for a batch (TF Serving): far below a second.
    for panel, ref_id in (
        ("TorchServe queue and inference time per request", "A"),
        ("TF Serving batching queue latency p50 / p99", "B"),
    ):
        values = _panel_values(live.prom, panel, ref_id)
        assert values and all(0 <= v < 1 for v in values), (panel, values)
