"""bench/proxy_cost.py end to end with tiny segments: real TorchServe, nginx, the Python floor
and the gateway (and a coalescing gateway), wrk as the client; every side answers 2xx only and
lands in the table and the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import proxy_cost
from tests.servers import REPO

pytestmark = pytest.mark.integration


def test_proxy_cost_measures_every_side_with_only_2xx(model_store: Path, tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "proxy_cost.py"),
            "--rounds",
            "1",
            "--segment",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--markdown",
            str(markdown),
            "--coalesce",
            '{"max_calls_in_flight": 1}',
            "--baseline",
            "HEAD",
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    coalesced = proxy_cost.coalesced_side({"max_calls_in_flight": 1})
    sides = [
        proxy_cost.DIRECT,
        proxy_cost.NGINX,
        proxy_cost.FLOOR,
        *proxy_cost.GATEWAY_SIDES,
        coalesced,
    ]
    for side in sides:
        assert side in result.stdout  # the terminal table
    report = json.loads((tmp_path / "out" / "proxy-cost.json").read_text())
    assert report["machine"]["loadavg_1_5_15"] and report["loadavg_after"]
    assert list(report["sides"]) == sides
    for side in sides:
        for level in ("1", "8"):
            row = report["sides"][side][level]
            assert row["requests"] > 0 and row["rps"] > 0, (side, level)
            assert row["non_2xx"] == 0 and row["socket_errors"] == 0, (side, level)
            assert 0 < row["p50_ms"] <= row["p99_ms"], (side, level)
            assert row["torchserve_cpu_ms_per_request"] > 0
            assert row["requests_per_torchserve_call"] > 0
            # Batches from TorchServe's worker log: one request each at least, half that when
            # a late log line of one segment falls into the next; batchSize 8 calls at most.
            batch = row["requests_per_torchserve_batch"]
            assert batch is not None, (side, level)  # the worker log showed batches
            assert 0.5 < batch <= (64 if side == coalesced else 8.5), (side, level, batch)
            if side == coalesced:  # rows per backend call, from the gateway's histogram
                assert row["gateway_rows_per_backend_call"] >= 1
            else:
                assert row["gateway_rows_per_backend_call"] is None
            if side == proxy_cost.DIRECT:
                assert row["proxy_cpu_ms_per_request"] is None
            else:  # nginx (master and worker), the floor or the gateway: measured from /proc
                assert row["proxy_cpu_ms_per_request"] is not None
                assert row["proxy_cpu_ms_per_request"] >= 0
    assert [r["side"] for r in report["table"]] == sides
    assert report["table"][0]["x_direct"] == 1.0
    # In front of the stub backend: the stub direct, nginx, the Python floor, this tree's
    # gateway and HEAD's (from a worktree), each with only 2xx answers and the proxies' CPU
    # measured.
    at_head = f"{proxy_cost.STUB_GATEWAY}, at HEAD"
    stub_sides = [
        proxy_cost.STUB_DIRECT,
        proxy_cost.STUB_NGINX,
        proxy_cost.STUB_FLOOR,
        proxy_cost.STUB_GATEWAY,
        at_head,
    ]
    assert list(report["stub"]) == stub_sides
    for side in stub_sides:
        assert side in result.stdout
        for level in ("1", "8"):
            row = report["stub"][side][level]
            assert row["requests"] > 0 and row["rps"] > 0, (side, level)
            cpu = row["proxy_cpu_ms_per_request"]
            assert (cpu is None) == (side == proxy_cost.STUB_DIRECT), (side, level, cpu)
    assert set(proxy_cost.stub_ratios(report["stub"], "8")) == {at_head}
    assert "this tree / HEAD" in result.stdout
    # The gateway against the Python floor, the floor against nginx, round by round, in front
    # of TorchServe and of the stub.
    for part, (gateway, floor, nginx) in [
        ("sides", proxy_cost.TORCHSERVE_FLOOR_SIDES),
        ("stub", proxy_cost.STUB_FLOOR_SIDES),
    ]:
        for side, reference in [(gateway, floor), (floor, nginx)]:
            for level in ("1", "8"):
                ratio = proxy_cost.round_ratio(report[part], level, side, reference)
                assert ratio is not None and ratio > 0, (part, side, reference, level)
    assert "in front of TorchServe: the gateway" in result.stdout
    assert "times the Python floor's" in result.stdout
    # Three targets for each gateway side and the floor in front of TorchServe, one in front
    # of the stub; the floor's are there to show what any Python proxy reaches here.
    assert len(report["targets"]) == 3 * (len(proxy_cost.GATEWAY_SIDES) + 2) + 1
    assert {t["side"] for t in report["targets"]} >= {proxy_cost.FLOOR, coalesced}
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    text = markdown.read_text()
    assert text.count(proxy_cost.BEGIN) == 1 and text.count(proxy_cost.END) == 1
    for side in [*sides, *stub_sides]:
        assert f"| {side} |" in text
