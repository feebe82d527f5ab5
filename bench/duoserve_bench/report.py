"""Statistics of a run, the machine it ran on, server CPU time from /proc, and the reports:
a terminal table, JSON, and PNG plots (matplotlib, imported only when plots are asked for)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from duoserve_bench.loadgen import CLIENT_TIMEOUT, GRPC_BASE, TRANSPORT_ERROR, Samples

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
# Log-spaced latency bins, 10 us .. 100 s, 40 per decade: enough for a CDF plot from JSON.
HIST_EDGES_S = np.logspace(-5, 2, 7 * 40 + 1)


# -- machine and process ------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPUs (and their model), load, Python, date."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": usable,
        "cpu_model": model,
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the rest follows its closing parenthesis.
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, children: bool = True) -> float:
    """utime + stime of ``pid`` (and, by default, of its live descendants, e.g. uvicorn
    workers), from /proc/<pid>/stat; raises ProcessLookupError when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(f"no process {pid}")
    total = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)
    if children:
        for child in _descendants(pid):
            child_fields = _stat_fields(child)
            if child_fields is not None:
                total += (int(child_fields[11]) + int(child_fields[12])) / _TICK
    return total


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


# -- statistics ---------------------------------------------------------------------------


def status_name(code: int) -> str:
    if code == TRANSPORT_ERROR:
        return "transport"
    if code == CLIENT_TIMEOUT:
        return "timeout"
    if code >= GRPC_BASE:
        return f"grpc_{code - GRPC_BASE}"
    return str(code)


def summarize(
    samples: Samples,
    *,
    window_s: float | None,
    meta: dict[str, Any],
    rows_per_request: int = 1,
    server_cpu_s: float | None = None,
) -> dict[str, Any]:
    """One run as a JSON-ready dict: counts, throughput, latency percentiles (ms, successful
    requests only), errors by status, CPU per request, a latency histogram."""
    ok = samples.status == 200
    latency = samples.latency[ok]
    done_at = samples.sent_at + samples.latency
    if window_s is None:  # a request-count run lasts until its last answer
        window_s = float(done_at.max()) if done_at.size else 0.0
    completed = int(np.count_nonzero(ok & (done_at <= window_s)))
    throughput = completed / window_s if window_s > 0 else 0.0
    codes, counts = np.unique(samples.status[~ok], return_counts=True)
    stats: dict[str, Any] = {
        **meta,
        "rows_per_request": rows_per_request,
        "window_s": round(window_s, 3),
        "requests": int(samples.status.size),
        "ok": int(ok.sum()),
        "errors": {status_name(int(c)): int(n) for c, n in zip(codes, counts, strict=True)},
        "warmup_requests": samples.warmup_requests,
        "throughput_rps": round(throughput, 2),
        "rows_per_s": round(throughput * rows_per_request, 2),
        "latency_ms": latency_stats(latency),
        # The client's CPU covers its warm-up requests too.
        "client_cpu_ms_per_request": (
            round(samples.client_cpu_s * 1000 / (samples.status.size + samples.warmup_requests), 4)
            if samples.status.size
            else None
        ),
        "server_cpu_ms_per_request": (
            round(server_cpu_s * 1000 / samples.status.size, 4)
            if server_cpu_s is not None and samples.status.size
            else None
        ),
        "histogram": histogram(latency),
    }
    return stats


def latency_stats(latency_s: np.ndarray) -> dict[str, float | None]:
    if latency_s.size == 0:
        return {k: None for k in ("min", "mean", *PERCENTILES, "max")}
    ms = latency_s * 1000
    values = np.percentile(ms, list(PERCENTILES.values()))
    out: dict[str, float | None] = {"min": round(float(ms.min()), 4)}
    out["mean"] = round(float(ms.mean()), 4)
    out.update({k: round(float(v), 4) for k, v in zip(PERCENTILES, values, strict=True)})
    out["max"] = round(float(ms.max()), 4)
    return out


def histogram(latency_s: np.ndarray) -> dict[str, list[float]]:
    """Non-empty log-spaced bins: upper edges (ms) and counts."""
    counts, _ = np.histogram(np.clip(latency_s, HIST_EDGES_S[0], HIST_EDGES_S[-1]), HIST_EDGES_S)
    keep = np.nonzero(counts)[0]
    return {
        "upper_ms": [round(float(HIST_EDGES_S[i + 1] * 1000), 5) for i in keep],
        "count": [int(counts[i]) for i in keep],
    }


# -- reports ------------------------------------------------------------------------------


def load_of(run: dict[str, Any]) -> str:
    return f"c={run['concurrency']}" if run["mode"] == "closed" else f"{run['rate']:g}/s"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table: one line per run."""
    header = (
        f"{'series':<34} {'load':>8} {'ok':>7} {'err':>5} {'req/s':>9} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'srv cpu ms/req':>14}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        lat = run["latency_ms"]
        errors = sum(run["errors"].values())
        lines.append(
            f"{run['label'][:34]:<34} {load_of(run):>8} {run['ok']:>7} {errors:>5} "
            f"{run['throughput_rps']:>9.1f} {_fmt(lat['p50']):>8} {_fmt(lat['p90']):>8} "
            f"{_fmt(lat['p99']):>8} {_fmt(lat['max']):>8} "
            f"{_fmt(run.get('server_cpu_ms_per_request'), 3):>14}"
        )
    return "\n".join(lines)


def _series(runs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["label"], []).append(run)
    for items in grouped.values():
        items.sort(key=lambda r: r["concurrency"] if r["mode"] == "closed" else r["rate"])
    return grouped


def write_plots(runs: Sequence[dict[str, Any]], directory: Path, title: str = "") -> list[Path]:
    """latency_vs_load.png, throughput.png, latency_distribution.png under ``directory``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    grouped = _series(runs)
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, items in grouped.items():
        xs = [r["concurrency"] if r["mode"] == "closed" else r["rate"] for r in items]
        for key, style in (("p50", "-o"), ("p99", "--s")):
            ys = [r["latency_ms"][key] for r in items]
            ax.plot(xs, ys, style, label=f"{label} {key}")
    ax.set_xlabel("load (concurrency, or requests/s in open loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"Latency percentiles vs load {title}".strip())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    path = directory / "latency_vs_load.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    closed = {k: [r for r in v if r["mode"] == "closed"] for k, v in grouped.items()}
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, items in closed.items():
        if items:
            ax.plot(
                [r["concurrency"] for r in items],
                [r["throughput_rps"] for r in items],
                "-o",
                label=label,
            )
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title(f"Throughput vs concurrency {title}".strip())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    path = directory / "throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    loads = sorted({load_of(r) for r in runs}, key=lambda s: float(s.strip("c=/s")))
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4.5), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for label, items in grouped.items():
            for run in items:
                if load_of(run) != load or not run["histogram"]["count"]:
                    continue
                counts = np.cumsum(run["histogram"]["count"])
                ax.step(
                    run["histogram"]["upper_ms"], counts / counts[-1], where="post", label=label
                )
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"Latency CDF at {load}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    path = directory / "latency_distribution.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
