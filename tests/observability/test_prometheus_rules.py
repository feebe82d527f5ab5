"""deploy/prometheus: promtool accepts the config and rules, and the alert unit tests pass."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from observability_contract import (
    PROMETHEUS_DIR,
    RULE_FILES,
    alert_rule_bodies,
    alert_rules,
    recording_rules,
    unknown_names,
    wrong_labels,
)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def promtool(*args: str, cwd: object = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_config() -> None:
    # From the config's folder: rule_files are relative to it, as in the container.
    result = promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    assert TEST_FILES
    result = promtool("test", "rules", *map(str, TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_promtool_test_rules_fails_when_an_alert_is_broken(tmp_path) -> None:
    """The unit tests bite: loosen the error-ratio threshold and they fail."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for path in RULE_FILES:
        text = path.read_text(encoding="utf-8").replace(
            "ratio_rate5m > 0.01", "ratio_rate5m > 0.001"
        )
        (tmp_path / "rules" / path.name).write_text(text, encoding="utf-8")
    for path in TEST_FILES:
        shutil.copy(path, tmp_path / "tests" / path.name)
    result = promtool("test", "rules", *(str(tmp_path / "tests" / p.name) for p in TEST_FILES))
    assert result.returncode != 0
    assert "DuoServeErrorRatioHigh" in result.stdout + result.stderr


def test_scrape_jobs_target_the_compose_services() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {
        job["job_name"]: (job["static_configs"][0]["targets"], job.get("metrics_path", "/metrics"))
        for job in config["scrape_configs"]
    }
    assert jobs == {
        "duoserve-gateway": (["gateway:8000"], "/metrics"),
        "torchserve": (["torchserve:8082"], "/metrics"),
        "tfserving": (["tfserving:8501"], "/monitoring/prometheus/metrics"),
        "dcgm": (["dcgm-exporter:9400"], "/metrics"),
    }
    assert config["rule_files"] == ["rules/*.yml"]


def test_recording_rules_follow_level_metric_operations() -> None:
    rules = recording_rules()
    assert len(rules) >= 10
    for name, expr in rules.items():
        assert re.fullmatch(r"framework_model:duoserve_[a-z_]+:[a-z0-9_]+", name), name
        assert unknown_names(expr) == set(), name
        assert wrong_labels(expr) == [], name
    for quantile in ("p50", "p95", "p99"):
        for metric in (
            "duoserve_request_duration_seconds",
            "duoserve_backend_request_duration_seconds",
        ):
            assert f"framework_model:{metric}:{quantile}_rate1m" in rules


def test_every_alert_is_actionable() -> None:
    bodies = alert_rule_bodies()
    assert {b["alert"] for b in bodies} >= {
        "DuoServeLatencyP99High",
        "DuoServeErrorRatioHigh",
        "DuoServeBackendDown",
        "DuoServeScrapeTargetDown",
        "DuoServeCircuitOpen",
        "DuoServeShadowDisagreement",
        "DuoServeNoTraffic",
    }
    for body in bodies:
        assert body.get("for"), f"{body['alert']} has no for:"
        assert body["labels"]["severity"] in {"critical", "warning", "info"}, body["alert"]
        assert body["annotations"]["summary"], body["alert"]
        assert len(body["annotations"]["description"]) > 80, body["alert"]
        assert unknown_names(body["expr"]) == set(), body["alert"]


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_every_alert_has_a_firing_and_a_silent_unit_test(alert: str) -> None:
    cases = [
        case
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == alert
    ]
    assert any(case["exp_alerts"] for case in cases), f"no test where {alert} fires"
    assert any(not case["exp_alerts"] for case in cases), f"no test where {alert} stays silent"
