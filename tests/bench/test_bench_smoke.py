"""`duoserve bench` end to end against a real gateway subprocess, and the open loop's promise:
latency counts from the intended send time, so a server that falls behind cannot hide it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web

from duoserve_bench.loadgen import Phase, run_phase
from duoserve_bench.targets import RequestSpec
from tests.servers import VENV_BIN, Gateway


@pytest.fixture(scope="module")
def gateway(pytorch_gateway: Gateway) -> Gateway:
    return pytorch_gateway


def test_bench_cli_reports_a_sane_closed_loop_run(gateway: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    plots = tmp_path / "plots"
    assert gateway.proc is not None
    result = subprocess.run(
        [
            str(VENV_BIN / "duoserve"),
            "bench",
            "digits",  # positional: the top-level parser passes everything after it on
            "--url",
            gateway.url,
            "--range",
            "0,16",
            "--concurrency",
            "1,4",
            "--warmup",
            "0.5",
            "--duration",
            "2",
            "--gateway-pid",
            str(gateway.proc.pid),
            "--json",
            str(out),
            "--plots",
            str(plots),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "p99 ms" in result.stdout  # the terminal table
    report = json.loads(out.read_text())
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu_model"]
    assert [run["concurrency"] for run in report["runs"]] == [1, 4]
    for run in report["runs"]:
        assert run["mode"] == "closed" and run["model"] == "digits"
        assert run["ok"] > 0 and run["requests"] == run["ok"]
        assert run["errors"] == {}
        assert run["throughput_rps"] > 0
        lat = run["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert run["server_cpu_ms_per_request"] > 0
        assert sum(run["histogram"]["count"]) == run["ok"]
    assert sorted(p.name for p in plots.iterdir()) == [
        "latency_distribution.png",
        "latency_vs_load.png",
        "throughput.png",
    ]


def test_bench_cli_explains_a_missing_signature(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "duoserve"), "bench", "digits", "--target", "torchserve", "--rate", "5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--payload" in result.stderr and "--input" in result.stderr


async def _serial_server(service_s: float) -> tuple[web.AppRunner, str]:
    """An HTTP server that handles one request at a time, each taking ``service_s``."""
    lock = asyncio.Lock()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        async with lock:
            await asyncio.sleep(service_s)
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_post("/infer", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/infer"


async def test_open_loop_latency_includes_the_queueing_of_a_server_that_falls_behind() -> None:
    # 20 ms of service, one at a time, offered 100 requests/s: the server needs 2 s for the
    # first second of arrivals, so later requests wait up to ~1 s. A closed loop would report
    # ~20 ms; measuring from the intended send time must show the backlog.
    runner, url = await _serial_server(0.02)
    try:
        spec = RequestSpec("http", url, b"{}", {"content-type": "application/json"})
        phase = Phase(spec=spec, mode="open", rate=100, warmup_s=0, duration_s=1.0)
        samples = await run_phase(phase, time.monotonic() + 0.05)
    finally:
        await runner.cleanup()
    assert 95 <= samples.status.size <= 101
    assert (samples.status == 200).all()
    assert samples.latency.max() > 0.5
    assert samples.latency.min() < 0.1
    # Intended send times stay on the 10 ms grid however slow the answers are.
    gaps = samples.sent_at[1:] - samples.sent_at[:-1]
    assert abs(float(gaps.mean()) - 0.01) < 1e-6
