"""Start and stop the TF Serving stand-in from tests.

handle = start_standin(model_base_path="models/store/tensorflow/digits")
... handle.grpc_address, handle.rest_url ...
handle.stop()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
MONITORING_CONFIG = REPO / "services" / "tfserving" / "monitoring.config"
BATCHING_CONFIG = REPO / "services" / "tfserving" / "batching.config"


@dataclass
class StandinHandle:
    """A running stand-in: its addresses, its process, and its log."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    rest_port: int
    log_path: Path
    model_names: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def set_delay(self, ms: float) -> None:
        """Make every Predict (REST and gRPC) wait this long first, from now on."""
        request = urllib.request.Request(
            f"{self.rest_url}/standin/delay?ms={ms}", method="POST", data=b""
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()

    def predicts(self) -> int:
        """Predictions this replica has run (REST and gRPC) since it started."""
        with urllib.request.urlopen(f"{self.rest_url}/standin/stats", timeout=5) as answer:
            return int(json.loads(answer.read())["predicts"])

    def trace_contexts(self) -> list[dict[str, str | None]]:
        """The W3C trace context each of the last Predicts carried, oldest first:
        ``{"api": "rest" | "grpc", "traceparent": ..., "tracestate": ...}`` (None: not sent)."""
        with urllib.request.urlopen(f"{self.rest_url}/standin/stats", timeout=5) as answer:
            return list(json.loads(answer.read())["trace_contexts"])

    def kill(self) -> None:
        """SIGKILL at once, as a crashed or evicted server dies."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; only this process, by its pid."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def write_model_config(
    path: Path,
    models: dict[str, str | Path],
    *,
    policy: str = "",
    labels: dict[str, dict[str, int]] | None = None,
) -> Path:
    """A model_config_list file; ``policy`` is a model_version_policy body, e.g. 'all {}'."""
    labels = labels or {}
    blocks = []
    for name, base_path in models.items():
        lines = [
            f'name: "{name}"',
            f'base_path: "{Path(base_path).resolve()}"',
            'model_platform: "tensorflow"',
        ]
        if policy:
            lines.append(f"model_version_policy {{ {policy} }}")
        for label, version in labels.get(name, {}).items():
            lines.append(f'version_labels {{ key: "{label}" value: {version} }}')
        blocks.append("  config {\n    " + "\n    ".join(lines) + "\n  }")
    path.write_text("model_config_list {\n" + "\n".join(blocks) + "\n}\n", encoding="utf-8")
    return path


def start_standin(
    model_base_path: str | Path | None = None,
    *,
    model_config_file: str | Path | None = None,
    model_name: str = "digits",
    port: int = 0,
    rest_port: int = 0,
    delay_ms: float = 0,
    monitoring: bool = True,
    tensor_content: bool = False,
    enable_batching: bool = False,
    max_concurrent_predicts: int = 0,
    bind_address: str = "127.0.0.1",
    startup_timeout_s: float = 90,
) -> StandinHandle:
    """Start the stand-in in a subprocess and return once every model answers its status.

    Give either ``model_base_path`` (served as ``model_name``, latest version) or a
    ``model_config_file``. Port 0 picks a free port.
    """
    workdir = Path(tempfile.mkdtemp(prefix="tfs-standin-"))
    if model_config_file is None:
        if model_base_path is None:
            raise ValueError("give model_base_path or model_config_file")
        model_config_file = write_model_config(
            workdir / "models.config", {model_name: model_base_path}
        )
    names = _model_names(Path(model_config_file))
    grpc_port = port or free_port()
    rest_port = rest_port or free_port()
    command = [
        sys.executable,
        "-m",
        "tests.tfserving_standin",
        f"--model_config_file={model_config_file}",
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--delay_ms={delay_ms}",
    ]
    if monitoring:
        command.append(f"--monitoring_config_file={MONITORING_CONFIG}")
    if tensor_content:
        command.append("--tensor_content")
    if bind_address != "127.0.0.1":
        command.append(f"--bind_address={bind_address}")
    if max_concurrent_predicts:
        command.append(f"--max_concurrent_predicts={max_concurrent_predicts}")
    if enable_batching:
        # As services/tfserving/Dockerfile runs the real server.
        command += ["--enable_batching", f"--batching_parameters_file={BATCHING_CONFIG}"]
    log_path = workdir / "standin.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    handle = StandinHandle(process, grpc_port, rest_port, log_path, names, bind_address)
    try:
        _wait_ready(handle, startup_timeout_s)
    except BaseException:
        handle.stop()
        raise
    return handle


def _model_names(config_file: Path) -> list[str]:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(
        config_file.read_text(encoding="utf-8"), model_server_config_pb2.ModelServerConfig()
    )
    return [model.name for model in config.model_config_list.config]


def _wait_ready(handle: StandinHandle, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(handle.model_names)
    while pending:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"TF Serving stand-in exited with {handle.process.returncode}:\n{handle.log()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"TF Serving stand-in not ready in {timeout_s}s:\n{handle.log()}")
        try:
            url = f"{handle.rest_url}/v1/models/{pending[0]}"
            with urllib.request.urlopen(url, timeout=2) as answer:
                states = json.loads(answer.read())["model_version_status"]
            if any(s["state"] == "AVAILABLE" for s in states):
                pending.pop(0)
                continue
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError):
            pass
        time.sleep(0.2)
