"""What the benchmark scripts share (bench/floor.py, proxy_cost.py, scale_out.py and
tracing_cost.py): bench/ on sys.path, the stub backend, and one `duoserve bench` segment that
reports a process's CPU per request.

A script puts the repository root on sys.path itself (it needs it to import this module), then
imports from here; importing this module puts bench/ before it, for duoserve_bench:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import REPO, ...  # noqa: E402
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from tests.servers import VENV_BIN, free_port  # noqa: E402


def start_stub_backend() -> tuple[subprocess.Popen[bytes], str]:
    """bench/stub_backend.py on a free loopback port, in its own process group (stop it with
    tests.servers.stop_group): the process and its URL. It does not wait for the port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench/stub_backend.py"), str(port)], start_new_session=True
    )
    return proc, f"http://127.0.0.1:{port}"


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


@contextmanager
def revision_trees(revisions: list[str], work: Path) -> Iterator[dict[str, Path]]:
    """Each git revision checked out in a temporary worktree under ``work`` (removed on the
    way out), keyed by the revision as given; a gateway started with PYTHONPATH at a tree's
    services/gateway runs that revision's code."""
    trees: dict[str, Path] = {}
    try:
        for revision in dict.fromkeys(revisions):  # each once
            tree = work / f"at-{len(trees)}-{revision.replace('/', '_')}"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree), revision],
                check=True,
            )
            trees[revision] = tree
        yield trees
    finally:
        for tree in trees.values():
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False
            )
