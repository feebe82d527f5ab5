"""The event panels (errors, retries, failovers, circuit, shadow) against real events.

A gateway whose config has a TorchServe backend nobody listens on, failover to the in-process
runtime, and shadow copies between the frameworks: every event the healthy test cannot
produce happens here, and the panels, rules and alerts about it must show it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from live_stack import drive, prometheus_scraping, running_gateway, wait_for
from observability_contract import (
    REPO_ROOT,
    ROLLOUT_METRICS,
    check_live,
    committed_dashboards,
    panel_queries,
    recording_rules,
)

from tests.prometheus_fixture import PrometheusHandle, free_port

pytestmark = pytest.mark.integration

DIGITS_IO = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}


def _faulty_config(path: Path) -> list[str]:
    """models.yaml with failing routes for both frameworks; returns the models to call."""
    local = {"backend": "local", "model": "digits"}
    broken = {"backend": "broken", "model": "digits"}
    config = {
        "backends": {
            "local": {"kind": "embedded", "model_store": str(REPO_ROOT / "models" / "store")},
            # Connection refused: the backend_down reason, retries, then an open circuit.
            "broken": {
                "kind": "torchserve",
                "url": f"http://127.0.0.1:{free_port()}",
                "timeout_ms": 500,
                "retries": 1,
            },
        },
        "models": {
            "broken-both": {
                **DIGITS_IO,
                "routes": [
                    {**broken, "framework": "pytorch"},
                    {**broken, "framework": "tensorflow"},
                ],
            },
            # The broken route always goes first; the weight-0 route takes over.
            "failover-to-tensorflow": {
                **DIGITS_IO,
                "failover": True,
                "routes": [
                    {**broken, "framework": "pytorch", "weight": 1},
                    {**local, "framework": "tensorflow", "weight": 0},
                ],
            },
            "failover-to-pytorch": {
                **DIGITS_IO,
                "failover": True,
                "routes": [
                    {**broken, "framework": "tensorflow", "weight": 1},
                    {**local, "framework": "pytorch", "weight": 0},
                ],
            },
            "shadowed-pytorch": {
                **DIGITS_IO,
                "routes": [{**local, "framework": "pytorch"}],
                "shadow": {**local, "framework": "tensorflow"},
            },
            "shadowed-tensorflow": {
                **DIGITS_IO,
                "routes": [{**local, "framework": "tensorflow"}],
                "shadow": {**local, "framework": "pytorch"},
            },
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return list(config["models"])


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrometheusHandle, dict]]:
    workdir = tmp_path_factory.mktemp("live-events")
    models = _faulty_config(workdir / "models.yaml")
    with (
        running_gateway(workdir / "models.yaml", workdir, "/v2/health/live") as url,
        prometheus_scraping(url, workdir) as prom,
    ):
        codes = drive(url, models, seconds=8.0)
        wait_for(prom, "framework_model:duoserve_shadow_disagreeing_items:ratio_rate5m", 2)
        wait_for(prom, 'ALERTS{alertname="DuoServeBackendDown"}', 1)
        yield prom, codes


def test_requests_fail_and_fail_over_as_configured(faulty: tuple[PrometheusHandle, dict]) -> None:
    _, codes = faulty
    assert 200 not in codes["broken-both"], codes
    for model in ("failover-to-tensorflow", "failover-to-pytorch", "shadowed-pytorch"):
        assert set(codes[model]) == {200}, codes


def test_event_panels_and_rules_show_the_events(
    faulty: tuple[PrometheusHandle, dict], record_property
) -> None:
    prom, _ = faulty
    queries = [(str(q), q.expr) for q in panel_queries(committed_dashboards().values())]
    queries += [(f"rule {name}", name) for name in recording_rules()]
    # Shedding needs more concurrent requests than a limit; it may stay absent, and so may
    # the rollout and reload series (this stack has neither).
    report = check_live(
        prom,
        queries,
        frozenset({"gateway"}),
        may_be_absent=frozenset({"duoserve_shed_requests_total"}) | ROLLOUT_METRICS,
    )
    record_property("live_check", report.summary())
    print(report.summary())
    assert report.failures == []
    absent = set().union(*report.no_events_yet.values())
    assert absent <= {"duoserve_shed_requests_total"} | ROLLOUT_METRICS, report.no_events_yet


def test_backend_errors_are_read_by_reason(faulty: tuple[PrometheusHandle, dict]) -> None:
    prom, _ = faulty
    by_reason = prom.query("sum by (framework, reason) (rate(duoserve_backend_errors_total[1m]))")
    reasons = {(r["metric"]["framework"], r["metric"]["reason"]) for r in by_reason}
    assert {f for f, _ in reasons} == {"pytorch", "tensorflow"}, reasons
    assert {"backend_down", "circuit_open"} & {r for _, r in reasons}, reasons


def test_alerts_about_the_broken_backend_go_pending(faulty: tuple[PrometheusHandle, dict]) -> None:
    """`for:` keeps them from firing within the test; pending proves expression and labels."""
    prom, _ = faulty
    alerts = prom.query('ALERTS{alertname=~"DuoServe.*"}')
    seen = {(a["metric"]["alertname"], a["metric"].get("backend")) for a in alerts}
    assert ("DuoServeBackendDown", "broken") in seen, seen
    assert ("DuoServeBackendDown", "local") not in seen, seen
    assert any(name == "DuoServeErrorRatioHigh" for name, _ in seen), seen
    ratio = prom.query('framework_model:duoserve_request_errors:ratio_rate1m{model="broken-both"}')
    assert ratio and all(float(r["value"][1]) == 1.0 for r in ratio), ratio


def test_error_ratio_names_the_failing_framework(faulty: tuple[PrometheusHandle, dict]) -> None:
    prom, _ = faulty
    ratio = prom.query('framework_model:duoserve_request_errors:ratio_rate1m{model="broken-both"}')
    assert {r["metric"]["framework"]: float(r["value"][1]) for r in ratio} == {
        "pytorch": 1.0,
        "tensorflow": 1.0,
    }
