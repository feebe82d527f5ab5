"""Start a real Prometheus (the Debian package's /usr/bin/prometheus) for a test.

    prom = start_prometheus(tmp_path, {"duoserve-gateway": ["127.0.0.1:8000"]}, RULE_FILES)
    try:
        prom.query('up{job="duoserve-gateway"}')
    finally:
        prom.stop()

Prometheus listens on 127.0.0.1 on a free port, keeps its TSDB under tmp_dir, and scrapes the
given jobs with the given rule files (the deploy/prometheus/rules ones by default), so tests
evaluate exactly the rules production runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.servers import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = REPO_ROOT / "deploy" / "prometheus" / "rules"
RULE_FILES: tuple[Path, ...] = tuple(sorted(RULES_DIR.glob("*.yml")))
PROMETHEUS_BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"

# Either targets scraped at /metrics, or one target with its own metrics path
# (TF Serving: ("127.0.0.1:8501", "/monitoring/prometheus/metrics")).
ScrapeTargets = Sequence[str] | tuple[str, str]


class PrometheusError(RuntimeError):
    """Prometheus did not start, or an API call failed; the message carries its log tail."""


class PrometheusHandle:
    """A running Prometheus: its base URL, a small client for its HTTP API, and stop()."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else PrometheusError."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            # 400/422 carry Prometheus's own explanation (a PromQL parse error, say).
            detail = error.read().decode("utf-8", errors="replace")
            raise PrometheusError(f"GET {url} -> {error.code}: {detail}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url} -> {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query now; the result vector ([{metric: {...}, value: [t, "v"]}, ...])."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health (up/down/unknown) and last error."""
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def wait_for_scrapes(self, jobs: Sequence[str], timeout_s: float = 30.0) -> None:
        """Block until every target of these jobs has been scraped successfully."""
        deadline = time.monotonic() + timeout_s
        while True:
            targets = [t for t in self.targets() if t["labels"].get("job") in jobs]
            if targets and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                states = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
                raise PrometheusError(f"targets of {list(jobs)} not up: {states}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate Prometheus (this pid only) and wait for it; idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> PrometheusHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _scrape_config(job: str, targets: ScrapeTargets) -> dict[str, Any]:
    if isinstance(targets, tuple):
        if len(targets) != 2 or not str(targets[1]).startswith("/"):
            raise ValueError(f"job {job}: a tuple is (host:port, metrics_path), got {targets!r}")
        hosts, path = [targets[0]], targets[1]
    elif isinstance(targets, str):
        raise ValueError(f"job {job}: give a list of host:port, not a bare string")
    else:
        hosts, path = list(targets), "/metrics"
    return {"job_name": job, "metrics_path": path, "static_configs": [{"targets": hosts}]}


def write_config(
    config_path: Path,
    scrape_targets: Mapping[str, ScrapeTargets],
    rule_files: Sequence[str | os.PathLike[str]],
    scrape_interval: str,
    evaluation_interval: str,
) -> None:
    """prometheus.yml for a test: the given jobs, the given rule files (absolute paths)."""
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [_scrape_config(job, t) for job, t in scrape_targets.items()],
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def start_prometheus(
    tmp_dir: str | os.PathLike[str],
    scrape_targets: Mapping[str, ScrapeTargets],
    rule_files: Sequence[str | os.PathLike[str]] = RULE_FILES,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    ready_timeout_s: float = 30.0,
) -> PrometheusHandle:
    """Start Prometheus on 127.0.0.1:<free port>; return once /-/ready answers 200.

    On any failure the process is killed and PrometheusError carries its log tail.
    """
    if not Path(PROMETHEUS_BINARY).exists():
        raise PrometheusError(f"{PROMETHEUS_BINARY} not found: apt-get install prometheus")
    workdir = Path(tmp_dir) / "prometheus"
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    write_config(config_path, scrape_targets, rule_files, scrape_interval, evaluation_interval)
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS_BINARY,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                # Small, fast, and nothing written outside tmp_dir.
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    handle = PrometheusHandle(process, f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_ready(handle, ready_timeout_s)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(handle: PrometheusHandle, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if handle.process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {handle.process.returncode}:\n{handle.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{handle.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise PrometheusError(f"prometheus not ready in {timeout_s}s:\n{handle.log_tail()}")
        time.sleep(0.1)
