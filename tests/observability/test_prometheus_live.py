"""The dashboards and rules against a real Prometheus scraping a real gateway.

No Grafana server runs here, so every dashboard query is run by Prometheus instead, with the
template variables set to "all". The gateway serves `digits` on both frameworks in-process
(models.yaml at the repo root); TorchServe, TF Serving and DCGM panels need those servers and
are listed as not checked here (tests that start them pass their jobs to `check_live`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_stack import drive, prometheus_scraping, running_gateway, wait_for
from observability_contract import (
    JOB_OF_SOURCE,
    PANELS_OF_SOURCE,
    REPO_ROOT,
    RULE_FILES,
    alert_rules,
    check_live,
    committed_dashboards,
    panel_queries,
    recording_rules,
    substitute,
    variable_selectors,
)

from tests.prometheus_fixture import PrometheusHandle, start_prometheus

pytestmark = pytest.mark.integration

MODELS = ["digits-pytorch", "digits-tensorflow"]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusHandle]:
    """Prometheus after 8 s of traffic to both frameworks of the default models.yaml."""
    workdir = tmp_path_factory.mktemp("live")
    with (
        running_gateway(REPO_ROOT / "models.yaml", workdir) as url,
        prometheus_scraping(url, workdir) as prom,
    ):
        codes = drive(url, MODELS, seconds=8.0)
        assert all(set(c) == {200} for c in codes.values()), codes
        wait_for(prom, "framework_model:duoserve_requests:rate1m", len(MODELS))
        yield prom


@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusHandle]:
    prom = start_prometheus(tmp_path_factory.mktemp("prom-empty"), {}, RULE_FILES)
    try:
        yield prom
    finally:
        prom.stop()


def test_every_query_and_rule_is_valid_promql(empty_prometheus: PrometheusHandle) -> None:
    """Prometheus itself parses every panel query, variable selector and rule expression."""
    dashboards = committed_dashboards().values()
    exprs = [q.expr for q in panel_queries(dashboards)]
    exprs += [s for d in dashboards for s in variable_selectors(d).values()]
    exprs += [*recording_rules().values(), *alert_rules().values()]
    for expr in exprs:
        empty_prometheus.query(substitute(expr))  # raises with Prometheus's parse error
    rules = empty_prometheus.api("rules")["groups"]
    assert {r["health"] for g in rules for r in g["rules"]} <= {"ok", "unknown"}
    assert sum(len(g["rules"]) for g in rules) == len(recording_rules()) + len(alert_rules())


@pytest.mark.parametrize("scraped_jobs", [("duoserve-gateway",)])
def test_every_gateway_panel_and_rule_has_data_for_both_frameworks(
    prometheus: PrometheusHandle, scraped_jobs: tuple[str, ...], record_property
) -> None:
    scraped = frozenset(s for s, job in JOB_OF_SOURCE.items() if job in scraped_jobs)
    queries = [(str(q), q.expr) for q in panel_queries(committed_dashboards().values())]
    queries += [(f"rule {name}", name) for name in recording_rules()]
    report = check_live(prometheus, queries, scraped)
    record_property("live_check", report.summary())
    print(report.summary())  # shown with -rA: which queries were checked, which not, and why
    assert report.failures == []
    # Nothing escapes: exactly the panels of the sources not scraped are left unchecked.
    unchecked_panels = {label.split(" | ")[1] for label in report.unchecked}
    expected = set().union(*(PANELS_OF_SOURCE[s] for s in PANELS_OF_SOURCE if s not in scraped))
    assert unchecked_panels == expected
    assert len(report.checked) >= 25


def test_healthy_traffic_raises_no_alert(prometheus: PrometheusHandle) -> None:
    up = prometheus.query('up{job="duoserve-gateway"}')
    assert [r["value"][1] for r in up] == ["1"]
    assert prometheus.query("duoserve_backend_up == 0") == []
    alerts = prometheus.query(
        'ALERTS{alertname=~"DuoServe(ErrorRatioHigh|BackendDown|CircuitOpen|ScrapeTargetDown)"}'
    )
    assert alerts == []
    # The error ratio reads 0 for both frameworks rather than nothing.
    ratios = prometheus.query(
        'framework_model:duoserve_request_errors:ratio_rate1m{model=~"digits-.*"}'
    )
    assert {r["metric"]["framework"]: r["value"][1] for r in ratios} == {
        "pytorch": "0",
        "tensorflow": "0",
    }
