"""The Grafana dashboards: generated, current, provisioned, and querying only real metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from observability_contract import (
    DASHBOARD_DIR,
    DATASOURCE,
    GRAFANA_DIR,
    committed_dashboards,
    load_generator,
    metric_names,
    panel_queries,
    panels,
    sources_of,
    substitute,
    unknown_names,
    variable_selectors,
    wrong_labels,
)

OVERVIEW = "duoserve-overview.json"
PER_MODEL = "duoserve-model.json"


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    return committed_dashboards()


def test_committed_dashboards_equal_the_generator_output() -> None:
    generator = load_generator()
    generated = {name: generator.render(d) for name, d in generator.build_dashboards().items()}
    committed = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARD_DIR.glob("*.json")}
    assert sorted(committed) == sorted(generated), "a dashboard file is missing or left over"
    for name, text in generated.items():
        assert committed[name] == text, f"{name} is stale: run `make dashboards`"


def test_generator_output_is_deterministic() -> None:
    generator = load_generator()
    first = {n: generator.render(d) for n, d in generator.build_dashboards().items()}
    second = {n: generator.render(d) for n, d in generator.build_dashboards().items()}
    assert first == second


def test_check_mode_fails_on_a_stale_copy_and_passes_after_regeneration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generator = load_generator()
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / OVERVIEW
    stale.write_text(stale.read_text(encoding="utf-8").replace("p99", "p98"), encoding="utf-8")
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1
    assert OVERVIEW in capsys.readouterr().err
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0


def test_dashboards_are_the_expected_ones(dashboards: dict[str, dict]) -> None:
    assert dashboards[OVERVIEW]["uid"] == "duoserve-overview"
    assert dashboards[OVERVIEW]["title"] == "DuoServe — PyTorch vs TensorFlow"
    assert dashboards[PER_MODEL]["uid"] == "duoserve-model"
    names = {uid: [v["name"] for v in d["templating"]["list"]] for uid, d in dashboards.items()}
    assert names[OVERVIEW] == ["model", "framework", "server_model"]
    assert names[PER_MODEL] == ["model", "framework"]


def test_every_panel_and_variable_uses_the_provisioned_datasource(
    dashboards: dict[str, dict],
) -> None:
    provisioned = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in provisioned] == [
        (DATASOURCE["uid"], DATASOURCE["type"], "http://prometheus:9090")
    ]
    for dashboard in dashboards.values():
        for panel in panels(dashboard):
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"], f"{panel['title']} has no query"
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, panel["title"]
        for variable in dashboard["templating"]["list"]:
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_dashboard_provider_loads_the_dashboards_folder() -> None:
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "duoserve.yml").read_text()
    )["providers"]
    assert len(provider) == 1
    assert provider[0]["type"] == "file"
    assert provider[0]["options"]["path"].endswith("/dashboards/duoserve")


def test_panels_do_not_overlap_and_ids_are_unique(dashboards: dict[str, dict]) -> None:
    for dashboard in dashboards.values():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
            area = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not area & cells, f"{panel['title']} overlaps another panel"
            cells |= area


def test_every_metric_a_panel_queries_is_exported_by_something(
    dashboards: dict[str, dict],
) -> None:
    queries = panel_queries(dashboards.values())
    assert len(queries) > 30
    problems = {str(q): unknown_names(q.expr) for q in queries if unknown_names(q.expr)}
    assert problems == {}
    labels = {str(q): wrong_labels(q.expr) for q in queries if wrong_labels(q.expr)}
    assert labels == {}


def test_template_variables_read_an_exported_metric(dashboards: dict[str, dict]) -> None:
    for dashboard in dashboards.values():
        for name, selector in variable_selectors(dashboard).items():
            if name == "server_model":
                # The backends' own model names, from either server's request counter.
                assert "ts_inference_requests_total" in selector
                assert ":tensorflow:serving:request_count" in selector
                continue
            assert metric_names(selector) == {"duoserve_requests_total"}, name
            assert wrong_labels(substitute(selector)) == []


def test_overview_shows_everything_the_issue_asks_for(dashboards: dict[str, dict]) -> None:
    overview = dashboards[OVERVIEW]
    shown = {n for q in panel_queries([overview]) for n in metric_names(q.expr)}
    wanted = {
        "framework_model:duoserve_request_duration_seconds:p50_rate1m",
        "framework_model:duoserve_request_duration_seconds:p95_rate1m",
        "framework_model:duoserve_request_duration_seconds:p99_rate1m",
        "framework_model:duoserve_requests:rate1m",
        "framework_model:duoserve_inferred_items:rate1m",
        "framework_model:duoserve_request_errors:ratio_rate1m",
        "duoserve_backend_errors_total",
        "duoserve_requests_in_flight",
        "duoserve_backend_requests_in_flight",
        "duoserve_shed_requests_total",
        "duoserve_backend_up",
        "duoserve_circuit_state",
        "ts_queue_latency_microseconds",
        "ts_inference_latency_microseconds",
        "QueueTime",
        "PredictionTime",
        ":tensorflow:serving:request_latency_bucket",
        ":tensorflow:serving:batching_session:queuing_latency_bucket",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "framework_model:duoserve_shadow_disagreeing_items:ratio_rate5m",
    }
    assert wanted - shown == set()
    # Every source has a row of its own.
    rows = {p["title"] for p in overview["panels"] if p["type"] == "row"}
    assert {"TorchServe", "TF Serving", "GPU", "Backend health", "Shadow comparison"} <= rows


def test_gateway_panels_filter_on_the_template_variables(dashboards: dict[str, dict]) -> None:
    """A panel about a framework and model must follow the pickers, or it lies about them."""
    for query in panel_queries(dashboards.values()):
        if "framework" in query.expr and sources_of_all(query.expr) == {"gateway"}:
            assert 'framework=~"$framework"' in query.expr, str(query)


def sources_of_all(expr: str) -> set[str]:
    return {s for name in metric_names(expr) for s in sources_of(name)}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (framework, le) (rate(duoserve_request_duration_seconds_bucket{model=~"a"}'
            "[$__rate_interval]))",
            {"duoserve_request_duration_seconds_bucket"},
        ),
        (
            "sum by (a, b) (rate(x_total[1m])) / ignoring (reason) group_left sum(rate(y[5m]))",
            {"x_total", "y"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(:tf:lat_bucket[1m]))) / 1e6",
            {":tf:lat_bucket"},
        ),
        ('1 - a:b:c{model="bool"} > bool 0.5 or on (x) vector(1)', {"a:b:c"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_a_misspelt_metric_or_label_is_caught() -> None:
    assert unknown_names("rate(duoserve_request_total[1m])") == {"duoserve_request_total"}
    assert wrong_labels('duoserve_backend_up{model="digits"}') == [
        "duoserve_backend_up has no label 'model'"
    ]
    assert unknown_names("sum(rate(ts_inference_requests_total[1m]))") == set()


def test_dashboard_json_is_valid_and_sorted() -> None:
    for path in DASHBOARD_DIR.glob("*.json"):
        text = path.read_text(encoding="utf-8")
        assert (
            text
            == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
