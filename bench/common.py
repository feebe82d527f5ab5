"""What the benchmark scripts share: one `duoserve bench` segment that reports a process's
CPU per request (bench/floor.py, tracing_cost.py)."""

from __future__ import annotations

import subprocess

from tests.servers import VENV_BIN


def bench_segment(
    url: str, pid: int, label: str, concurrency: str, seconds: str, metadata_url: str
) -> float | None:
    """One `duoserve bench` segment of digits-pytorch against ``url`` (closed loop at
    ``concurrency``, 1 s of warm-up, then ``seconds``), reporting the CPU time of process
    ``pid`` and reading the model's metadata from ``metadata_url`` (a gateway). Prints its
    result lines (those starting with ``label``; the output's tail when there are none) and
    returns the last one's last number, the CPU ms per request (None: not reported)."""
    cmd = [
        str(VENV_BIN / "duoserve"),
        "bench",
        "digits-pytorch",
        "--url",
        url,
        "--concurrency",
        concurrency,
        "--duration",
        seconds,
        "--warmup",
        "1",
        "--no-progress",
        "--gateway-pid",
        str(pid),
        "--label",
        label,
        "--metadata-url",
        metadata_url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(label)]
    print("\n".join(lines) or out.stdout[-800:] + out.stderr[-800:], flush=True)
    try:
        return float(lines[-1].split()[-1])
    except (IndexError, ValueError):
        return None
