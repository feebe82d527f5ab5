"""Run TorchServe as a container's main process: stop it within a bound, and fail when it dies.

TorchServe 0.12's launcher does neither. ``torchserve --start --foreground`` starts the Java
frontend, waits for it and then exits 0 whatever became of the frontend, and installs no
signal handler (as PID 1 it would ignore SIGTERM until the kill). ``torchserve --stop
--foreground`` waits up to 60 s for the frontend, longer than the stop time compose and
Kubernetes allow after their own pauses. This wrapper runs the launcher and:

* on SIGTERM or SIGINT stops the frontend as ``torchserve --stop`` does (SIGTERM to the Java
  process, then removes the pid file and the key file), and kills it if it has not exited within
  ``TS_STOP_TIMEOUT_S`` seconds (default 20);
* exits 0 after a requested stop that finished in time, 1 when the server ended on its own (the
  frontend crashed or never came up) or had to be killed, and with the launcher's own status
  when the launcher failed (a bad argument, a missing model store).

Usage, as the image's ENTRYPOINT (compose ``command`` and Kubernetes ``args`` are appended)::

    python entrypoint.py --ts-config FILE --model-store DIR [more torchserve options]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

# Seconds the Java frontend gets to exit after SIGTERM before it is killed. Deployments give the
# container at least this much after their preStop pause (tests/deploy pins it).
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2
PREFIX = "duoserve-torchserve:"


def log(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def stop_timeout_s() -> float:
    return float(os.environ.get("TS_STOP_TIMEOUT_S", STOP_TIMEOUT_S))


def pid_file() -> Path:
    """Where the launcher records the Java frontend's pid (its temp dir, like the launcher)."""
    return Path(tempfile.gettempdir()) / ".model_server.pid"


def frontend_pid() -> int | None:
    try:
        return int(pid_file().read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop(launcher: subprocess.Popen[bytes]) -> int:
    """Stop the frontend (and so the launcher) within the stop timeout; kill it past that."""
    timeout = stop_timeout_s()
    deadline = time.monotonic() + timeout
    # A stop asked for during start-up: the pid file follows the frontend's start at once.
    pid = frontend_pid()
    while pid is None and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
        pid = frontend_pid()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file().unlink(missing_ok=True)
        # Stale keys must not outlive the server (the launcher's --stop removes them too).
        Path("key_file.json").unlink(missing_ok=True)
    try:
        launcher.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log(f"TorchServe did not stop within {timeout:g} s of SIGTERM; killing it")
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # The launcher reaps the killed frontend and exits; kill it too if it does not.
        try:
            launcher.wait(timeout=5)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
        return 1
    log("TorchServe stopped")
    return 0


def main(argv: list[str]) -> int:
    # A pid file left in a reused /tmp (an emptyDir outlives a container restart) would name a
    # process of the old container.
    pid_file().unlink(missing_ok=True)
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    launcher = subprocess.Popen(["torchserve", "--start", "--foreground", "--ncs", *argv])
    while launcher.poll() is None and not stopping:
        time.sleep(POLL_S)
    if stopping:
        return stop(launcher)
    status = launcher.returncode
    if status != 0:
        log(f"the TorchServe launcher failed with status {status}")
        return status if status > 0 else 128 - status
    log("TorchServe ended on its own (its Java frontend exited); see its log above")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
