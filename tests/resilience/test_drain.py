"""Graceful drain: SIGTERM under steady load. Readiness turns 503 at once while requests are still
served; then the listener closes, requests in flight finish, and the process exits within the
grace period. No request the gateway accepted goes unanswered."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import v2_body
from tests.resilience.conftest import digits, start_gateway, tfs_backend
from tests.servers import wait_until
from tests.tfserving_standin.fixture import StandinHandle

pytestmark = pytest.mark.integration

DELAY_S, GRACE_S, BACKEND_MS = 1.0, 5.0, 300


def test_sigterm_drains_without_dropping_accepted_requests(
    tmp_path: Path, standin: StandinHandle
) -> None:
    standin.set_delay(BACKEND_MS)
    config = {
        "backends": {"tfs": tfs_backend(standin)},
        "models": {
            "digits": digits([{"backend": "tfs", "framework": "tensorflow", "model": "digits"}])
        },
    }
    body = orjson.dumps(v2_body((np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)))
    stop = threading.Event()
    outcomes: list[tuple[float, str]] = []  # (time sent, 200 | refused | <other>)
    readiness: list[tuple[float, int]] = []
    lock = threading.Lock()

    server = None

    def client_loop() -> None:
        assert server is not None
        with httpx.Client(base_url=server.url, timeout=10) as client:  # keep-alive
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answer = client.post("/v2/models/digits/infer", content=body)
                    outcome = str(answer.status_code)
                except httpx.ConnectError:
                    outcome = "refused"  # never accepted: the listener was closed
                    time.sleep(0.02)
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                with lock:
                    outcomes.append((sent, outcome))

    def probe_loop() -> None:
        assert server is not None
        while not stop.is_set():
            at = time.monotonic()
            try:
                status = httpx.get(server.url + "/v2/health/ready", timeout=2).status_code
            except httpx.HTTPError:
                status = 0
            readiness.append((at, status))
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    threads.append(threading.Thread(target=probe_loop))
    try:
        server = start_gateway(
            tmp_path,
            config,
            DUOSERVE_DRAIN_DELAY_S=str(DELAY_S),
            DUOSERVE_DRAIN_GRACE_S=str(GRACE_S),
        )
        assert server.proc is not None
        for thread in threads:
            thread.start()

        def under_load() -> bool:
            with lock:
                answered = sum(o == "200" for _, o in outcomes)
            return answered >= 8 and any(s == 200 for _, s in readiness)

        wait_until(under_load, 30, "steady load, answered, and readiness probed")
        term_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        returncode = server.proc.wait(DELAY_S + GRACE_S + 5)
        exited_after = time.monotonic() - term_at
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(15)
        standin.set_delay(0)
        if server is not None:
            server.stop()

    after = [(t - term_at, o) for t, o in outcomes if t >= term_at]
    kinds = {o for _, o in outcomes}
    first_503 = min((t - term_at for t, s in readiness if t >= term_at and s == 503), default=None)
    served_while_draining = [t for t, o in after if o == "200" and t < DELAY_S]
    odd = [(round(t - term_at, 3), o) for t, o in outcomes if o not in ("200", "refused")]
    print(
        f"\nexit {exited_after:.2f} s after SIGTERM (code {returncode}); "
        f"readiness 503 after {first_503}; outcomes {sorted(kinds)}; "
        f"{len(served_while_draining)} served during the drain delay; "
        f"other outcomes (sent s after SIGTERM): {odd}"
    )
    assert kinds <= {"200", "refused"}, kinds  # every accepted request answered 200
    assert sum(o == "200" for _, o in outcomes) > 10
    # Readiness turned 503 during the drain delay, before the listener closed, and stayed so.
    assert first_503 is not None and first_503 < DELAY_S
    assert all(s in (503, 0) for t, s in readiness if t - term_at >= first_503)
    assert served_while_draining  # the delay kept serving while balancers caught up
    assert DELAY_S <= exited_after < DELAY_S + GRACE_S
    assert returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
