"""Real servers for the tests: TorchServe (pip + Java 17) and the gateway itself, each on
127.0.0.1 with free ports, started as process groups and stopped by pid (also on failure)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting:\n{tail}")
        try:
            if check():
                return
        except (OSError, ValueError):  # not up yet, or a file caught half-written
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout_s} s:\n{tail}")


def http_get(
    url: str, timeout: float = 2.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the whole process group (a server's children too), wait, then SIGKILL."""
    pgid = proc.pid
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not linger as a zombie
        time.sleep(0.1)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


# TorchServe's Java frontend puts each worker's Unix socket at <java.io.tmpdir>/.ts.sock.<port>,
# and java.io.tmpdir is /tmp whatever TMPDIR says: two servers with the same initial worker port
# would take over each other's sockets. Each server gets a block no socket of this machine uses
# and no other server of this process was given.
_WORKER_PORT_BLOCK = 16
_reserved_worker_ports: set[int] = set()


def reserve_worker_ports(models: int) -> int:
    """The first of a block of worker ports (one per model worker) free for a new TorchServe."""
    size = max(_WORKER_PORT_BLOCK, models)
    start = 20000 + (os.getpid() % 1000) * 20
    for first in range(start, 60000 - size, size):
        block = range(first, first + size)
        if any(p in _reserved_worker_ports for p in block):
            continue
        if any(Path(f"/tmp/.ts.sock.{p}").exists() for p in block):
            continue
        _reserved_worker_ports.update(block)
        return first
    raise RuntimeError("no free block of TorchServe worker ports")


class TorchServe:
    """A real TorchServe 0.12 with token auth on, serving the archives of a model store."""

    def __init__(
        self,
        workdir: Path,
        model_store: Path,
        models: dict[str, dict[str, object]],
        *,
        token_auth: bool = True,
    ):
        self.workdir = workdir
        self.token_auth = token_auth
        self.model_store = model_store
        self.models = models
        self.inference_port = free_port()
        self.management_port = free_port()
        self.metrics_port = free_port()
        self.grpc_ports = (free_port(), free_port())
        self.worker_port = reserve_worker_ports(len(models))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "torchserve.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def inference_key(self) -> str:
        return str(json.loads(self.key_file.read_text())["inference"]["key"])

    def auth(self) -> dict[str, str]:
        """The Authorization header its inference API wants (none without token auth)."""
        return {"Authorization": f"Bearer {self.inference_key()}"} if self.token_auth else {}

    def inference_count(self) -> int:
        """Inference requests TorchServe has answered, from its own metrics API."""
        _, body = http_get(f"http://{self.metrics_target}/metrics")
        return int(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in body.decode().splitlines()
                if line.startswith("ts_inference_requests_total{")
            )
        )

    def write_config(self) -> Path:
        models = {
            name: {
                "1": {
                    "defaultVersion": True,
                    "marName": f"{name}.mar",
                    "minWorkers": 1,
                    "maxWorkers": 1,
                    "batchSize": int(options.get("batchSize", 1)),  # type: ignore[call-overload]
                    "maxBatchDelay": int(options.get("maxBatchDelay", 5)),  # type: ignore[call-overload]
                    "responseTimeout": 30,
                }
            }
            for name, options in self.models.items()
        }
        lines = [
            f"inference_address=http://127.0.0.1:{self.inference_port}",
            f"management_address=http://127.0.0.1:{self.management_port}",
            f"metrics_address=http://127.0.0.1:{self.metrics_port}",
            "grpc_inference_address=127.0.0.1",
            "grpc_management_address=127.0.0.1",
            f"grpc_inference_port={self.grpc_ports[0]}",
            f"grpc_management_port={self.grpc_ports[1]}",
            "metrics_mode=prometheus",
            "enable_model_api=false",
            "disable_system_metrics=true",
            "install_py_dep_per_model=false",
            f"model_store={self.model_store}",
            f"load_models={','.join(f'{m}.mar' for m in self.models)}",
            "default_workers_per_model=1",
            # Worker sockets are /tmp/.ts.sock.<port>: a port of our own keeps parallel runs apart.
            f"initial_worker_port={self.worker_port}",
            "job_queue_size=100",
            # Keys expire after 60 min by default; a long test session must outlive that.
            "token_expiration_min=600",
            f"models={json.dumps(models)}",
        ]
        if not self.token_auth:  # as in Kubernetes, where every replica would mint its own key
            lines.append("disable_token_authorization=true")
        path = self.workdir / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _start(self, timeout_s: float) -> None:
        config = self.write_config()
        # TorchServe keeps its pid file in the temp dir and refuses to start when one exists:
        # a temp dir per server lets several run side by side (and leaves the machine's alone).
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        }
        self.key_file.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(VENV_BIN / "torchserve"),
                    "--start",
                    "--foreground",
                    "--ncs",
                    "--ts-config",
                    str(config),
                    "--model-store",
                    str(self.model_store),
                ],
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        # TorchServe 0.12 asks for the inference key even on /ping.
        def healthy() -> bool:
            if self.token_auth and not self.key_file.exists():
                return False
            status, body = http_get(self.url + "/ping", headers=self.auth())
            return status == 200 and json.loads(body).get("status") == "Healthy"

        wait_until(healthy, timeout_s, "TorchServe", self.proc, self.log)
        # /ping says Healthy before a worker has loaded the model: warm each model up.
        for name, options in self.models.items():
            body = json.dumps(options.get("warmup", [[[0.0] * 8] * 8])).encode()

            def answers(name: str = name, body: bytes = body) -> bool:
                request = urllib.request.Request(
                    f"{self.url}/predictions/{name}",
                    data=body,
                    headers={**self.auth(), "Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                        return bool(response.status == 200)
                except urllib.error.HTTPError:
                    return False

            wait_until(answers, timeout_s, f"TorchServe model {name}", self.proc, self.log)

    def start(self, timeout_s: float = 180.0) -> None:
        """Start and wait until every model answers; a server that never got there is stopped
        before the error is raised (its caller has nothing to stop yet)."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=15)
            self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Gateway:
    """`duoserve serve` as a subprocess on a free port."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None):
        self.config = config
        self.port = free_port()
        self.workdir = workdir
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"gateway-{self.port}.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0, *extra: str) -> None:
        env = {**os.environ, **self.env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(VENV_BIN / "duoserve"),
                    "serve",
                    "--config",
                    str(self.config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *extra,
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            return http_get(self.url + "/v2/health/ready")[0] == 200

        try:
            wait_until(ready, timeout_s, "the gateway", self.proc, self.log)
        except BaseException:
            self.stop()  # never ready: stopped here, the caller has nothing to stop yet
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None
