"""Real Open Inference Protocol servers for the tests, and a tap that shows what went over the
wire to them.

- ``MLServerProcess``: Seldon MLServer (``mlserver start``) from .venv-mlserver, serving
  `digits` through the custom runtime in mlserver_digits.py.
- ``TritonProcess``: NVIDIA Triton (the tritonserver nvidia-pytriton bundles) from
  .venv-triton, serving `digits` in its Python backend (triton_digits.py).
- ``WireTap``: an HTTP relay in front of either that records each request (method, path,
  whether its body used the binary tensor extension, the answer's status) and can be pointed
  at another server mid-test (a replica replaced behind the same address).

Both servers compute the real digits model from its trained weights (digits_numpy.py), so
their answers can be held to the embedded PyTorch runtime's. Each runs as its own process
group on 127.0.0.1 with free ports and is stopped by its pid in a finally. `make v2-servers`
(a prerequisite of `make test`) creates both virtual environments; a missing one fails loudly.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.loopback_http import LoopbackHTTPServer
from tests.servers import REPO, free_port, http_get, stop_group, wait_until

HERE = Path(__file__).resolve().parent
MLSERVER_VENV = REPO / ".venv-mlserver"
TRITON_VENV = REPO / ".venv-triton"
MODEL = "digits"


def _venv_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        raise RuntimeError(
            f"{venv.name} is missing: run `make v2-servers` (make test does) to install the "
            "real V2 servers the tests start"
        )
    return python


def _server_env() -> dict[str, str]:
    """The environment of a server in its own venv: this folder importable (the runtime and
    digits_numpy), none of the gateway venv's Python paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(HERE)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _ServerProcess:
    name = "server"

    def __init__(self, workdir: Path, weights: Path) -> None:
        self.workdir = workdir
        self.weights = weights
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout_s: float = 120.0) -> None:
        """Start and wait until `digits` is ready; a server that never gets there is stopped."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=_server_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: http_get(f"{self.url}/v2/models/{MODEL}/ready")[0] == 200,
                timeout_s,
                self.name,
                self.proc,
                self.log,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=15)
            self.proc = None


class MLServerProcess(_ServerProcess):
    """Seldon MLServer 1.7 with one model, `digits` version 1 (custom runtime)."""

    name = "mlserver"

    def command(self) -> list[str]:
        python = _venv_python(MLSERVER_VENV)
        model_dir = self.workdir / MODEL
        model_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "host": "127.0.0.1",
            "http_port": self.http_port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "metrics_dir": str(self.workdir / "metrics"),
            "environments_dir": str(self.workdir / "envs"),
        }
        (self.workdir / "settings.json").write_text(json.dumps(settings))
        model = {
            "name": MODEL,
            "implementation": "mlserver_digits.DigitsRuntime",
            "parameters": {"uri": str(self.weights), "version": "1"},
        }
        (model_dir / "model-settings.json").write_text(json.dumps(model))
        return [str(python.parent / "mlserver"), "start", str(self.workdir)]


class TritonProcess(_ServerProcess):
    """NVIDIA Triton 2.51 (nvidia-pytriton 0.7) with one model, `digits` version 1."""

    name = "triton"

    def command(self) -> list[str]:
        python = _venv_python(TRITON_VENV)
        workspace = self.workdir / "workspace"
        return [
            str(python),
            str(HERE / "triton_digits.py"),
            str(self.weights),
            str(self.http_port),
            str(free_port()),
            str(free_port()),
            str(workspace),
        ]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it went over the wire, and the status of its answer."""

    method: str
    path: str
    binary: bool
    """The body used the binary tensor extension (Inference-Header-Content-Length)."""
    content_type: str
    status: int
    binary_answer: bool


class WireTap:
    """An HTTP/1.1 relay on 127.0.0.1 (``port``, or a free one) in front of ``upstream`` that
    records every request; 502 when nothing answers upstream, as a proxy would."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.upstream = upstream
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        tap = self

        class Relay(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                forwarded = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "content-length")
                }
                host, port = tap.upstream.removeprefix("http://").split(":")
                upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=forwarded)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    headers = answer.getheaders()
                    status = answer.status
                except OSError:  # nothing there: what a proxy answers
                    payload = b'{"error": "upstream unreachable"}'
                    headers = [("content-type", "application/json")]
                    status = 502
                finally:
                    upstream.close()
                kept = {k.lower(): v for k, v in headers}
                with tap._lock:
                    tap.seen.append(
                        Seen(
                            self.command,
                            self.path,
                            "inference-header-content-length" in {k.lower() for k in self.headers},
                            self.headers.get("content-type", ""),
                            status,
                            "inference-header-content-length" in kept,
                        )
                    )
                self.send_response(status)
                for name in ("content-type", "inference-header-content-length"):
                    if name in kept:
                        self.send_header(name, kept[name])
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _relay  # noqa: N815 - http.server's method names

        self._http = LoopbackHTTPServer(Relay, port)
        self.port = self._http.port

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def calls(self, suffix: str) -> list[Seen]:
        """The recorded requests whose path ends with ``suffix`` (e.g. "/infer", "/v2")."""
        with self._lock:
            return [s for s in self.seen if s.path.endswith(suffix)]

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    def close(self) -> None:
        self._http.close()
