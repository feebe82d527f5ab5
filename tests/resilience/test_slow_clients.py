"""Slow, idle and oversized clients against a gateway subprocess over real sockets, with short
deadlines set through the environment: a head or body that comes too slowly gets 408 and its
connection closed, a connection that never sends a byte is closed, a huge head gets 431, and
past the connection cap new connections get 503 at once. Meanwhile a normal client on its
kept-alive connection is served throughout, and every refusal is counted in /metrics."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import yaml

from tests.conftest import DIGITS_IO, v2_body
from tests.servers import Gateway

pytestmark = pytest.mark.integration

HEAD_S, BODY_IDLE_S, BODY_TOTAL_S = 1.0, 1.0, 3.0
MAX_CONNECTIONS, MAX_HEAD_BYTES = 40, 8192
# Generous: the deadline is checked against its own setting, the margin covers a busy machine.
MARGIN_S = 8.0
INFER = "/v2/models/digits/infer"
BODY = orjson.dumps(v2_body((np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)))


def start(workdir: Path, model_store: Path, *extra: str) -> Gateway:
    config = workdir / "models.yaml"
    routes = [{"backend": "local", "framework": "pytorch"}]
    config.write_text(
        yaml.safe_dump(
            {
                "backends": {"local": {"kind": "embedded", "model_store": str(model_store)}},
                "models": {"digits": {**DIGITS_IO, "routes": routes}},
            }
        )
    )
    env = {
        "DUOSERVE_LOG_LEVEL": "warning",
        "DUOSERVE_CLIENT_HEADER_TIMEOUT_S": str(HEAD_S),
        "DUOSERVE_CLIENT_BODY_TIMEOUT_S": str(BODY_IDLE_S),
        "DUOSERVE_CLIENT_BODY_TOTAL_S": str(BODY_TOTAL_S),
        "DUOSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "DUOSERVE_MAX_HEAD_BYTES": str(MAX_HEAD_BYTES),
    }
    server = Gateway(config, workdir, env)
    try:
        server.start(120, *extra)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def guarded(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = start(tmp_path_factory.mktemp("guarded-gateway"), model_store)
    try:
        yield server
    finally:
        server.stop()


class NormalClient:
    """Inference requests one after another on one kept-alive connection, in a thread, until
    stopped; every outcome is recorded."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)
        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.client.post(INFER, content=BODY)
                self.outcomes.append(str(answer.status_code))
            except httpx.HTTPError as error:
                self.outcomes.append(type(error).__name__)
            self._stop.wait(0.05)

    def __enter__(self) -> NormalClient:
        self.client.post(INFER, content=BODY)  # its connection is open before anything else
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    def served_throughout(self) -> None:
        assert len(self.outcomes) >= 5, self.outcomes
        assert set(self.outcomes) == {"200"}, self.outcomes


def connect(server: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=MARGIN_S)


def answer_of(sock: socket.socket, wait_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``wait_s`` passes)."""
    sock.settimeout(wait_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {wait_s} s; got {data[:200]!r}")
    except ConnectionResetError:
        pass  # closed with our unread bytes in its buffer: what was sent before still counts
    return data


def one_answer(sock: socket.socket) -> bytes:
    """One whole answer on a kept-alive connection: its head, then Content-Length bytes (the
    head and body may come in separate segments)."""
    sock.settimeout(MARGIN_S)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    assert length, head
    while len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def trickle(sock: socket.socket, pieces: list[bytes], every_s: float) -> tuple[bytes, float]:
    """Send one piece every ``every_s`` until the server answers; return the whole answer
    (read until the server closes) and the seconds from the first piece to its first byte."""
    started = time.monotonic()
    sock.settimeout(every_s)
    for piece in pieces:
        try:
            sock.sendall(piece)
            first = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            first = b""
        elapsed = time.monotonic() - started
        return first + (answer_of(sock, MARGIN_S) if first else b""), elapsed
    pytest.fail(f"no answer after {len(pieces)} pieces, {time.monotonic() - started:.1f} s")


def status_and_body(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, orjson.loads(body)


def counter(url: str, name: str, reason: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(rf'^{name}\{{reason="{reason}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_slow_head_gets_408_and_a_silent_connection_is_closed(guarded: Gateway) -> None:
    before = counter(guarded.url, "duoserve_client_timeouts_total", "head")
    with NormalClient(guarded.url) as normal:
        slow, silent = connect(guarded), connect(guarded)
        try:
            # A request line, then one header line at a time, never the blank line.
            lines = [f"POST {INFER} HTTP/1.1\r\nHost: gateway\r\n".encode()]
            lines += [f"X-Slow-{i}: {i}\r\n".encode() for i in range(40)]
            answer, elapsed = trickle(slow, lines, every_s=0.2)
            status, headers, body = status_and_body(answer)
            assert status == 408
            assert headers["connection"] == "close"
            assert "request head did not arrive within 1 s" in body["error"]
            assert HEAD_S - 0.1 <= elapsed <= HEAD_S + MARGIN_S
            assert answer_of(silent, MARGIN_S) == b""  # closed, nothing to answer
        finally:
            slow.close()
            silent.close()
    normal.served_throughout()
    assert counter(guarded.url, "duoserve_client_timeouts_total", "head") - before == 2


def test_blank_lines_between_requests_do_not_keep_a_connection_open(guarded: Gateway) -> None:
    # uvicorn's keep-alive timer stops at any byte, and blank lines begin no request.
    with connect(guarded) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert one_answer(sock).startswith(b"HTTP/1.1 200")
        answer, elapsed = trickle(sock, [b"\r\n"] * 40, every_s=0.2)
    assert answer == b""  # closed: no request began, so none is answered
    assert HEAD_S - 0.1 <= elapsed <= HEAD_S + MARGIN_S


def test_answers_name_no_server_software(guarded: Gateway) -> None:
    # Neither an answer of the app (200, 404) nor one of the connection guard (408) says what
    # the gateway runs on; each carries a date.
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        answers = [
            client.get("/v2/health/live"),
            client.post(INFER, content=BODY, headers={"content-type": "application/json"}),
            client.get("/no/such/path"),
        ]
    assert [a.status_code for a in answers] == [200, 200, 404]
    with connect(guarded) as sock:  # a head that never ends: the guard's 408
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: gateway\r\n".encode())
        status, guard_headers, _ = status_and_body(answer_of(sock, HEAD_S + MARGIN_S))
    assert status == 408
    for headers in [*(dict(a.headers) for a in answers), guard_headers]:
        assert "server" not in headers and "date" in headers


def test_a_trickling_or_stalled_body_gets_408(guarded: Gateway) -> None:
    before = {
        reason: counter(guarded.url, "duoserve_client_timeouts_total", reason)
        for reason in ("body_total", "body_idle")
    }
    with NormalClient(guarded.url) as normal:
        trickler = connect(guarded)
        stalled: socket.socket | None = None
        try:
            head = (
                f"POST {INFER} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                f"X-Request-Id: trickle-1\r\nContent-Length: {len(BODY)}\r\n\r\n"
            ).encode()
            # A byte every 0.25 s: never idle for BODY_IDLE_S, so only the total deadline ends it.
            answer, elapsed = trickle(trickler, [head] + [bytes([b]) for b in BODY], every_s=0.25)
            status, headers, body = status_and_body(answer)
            assert status == 408
            assert headers["x-request-id"] == "trickle-1"
            assert "request body did not arrive within 3 s" in body["error"]
            assert BODY_TOTAL_S - 0.1 <= elapsed <= BODY_TOTAL_S + MARGIN_S

            # Part of a body, then silence: the pause deadline, in TorchServe's error shape.
            stalled = connect(guarded)
            stalled.sendall(
                b"POST /predictions/digits HTTP/1.1\r\nHost: gateway\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n[[[0, 1"
            )
            status, headers, body = status_and_body(answer_of(stalled, BODY_IDLE_S + MARGIN_S))
            assert status == 408
            assert body["code"] == 408
            assert "no byte for 1 s" in body["message"]
        finally:
            trickler.close()
            if stalled is not None:
                stalled.close()
    normal.served_throughout()
    for reason in ("body_total", "body_idle"):
        assert counter(guarded.url, "duoserve_client_timeouts_total", reason) - before[reason] == 1


def test_a_head_over_the_limit_gets_431_at_once(guarded: Gateway) -> None:
    before = counter(guarded.url, "duoserve_rejected_connections_total", "head_too_large")
    with connect(guarded) as sock:
        # One header line that never ends; the head deadline is far from here.
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 2 * MAX_HEAD_BYTES)
        status, headers, body = status_and_body(answer_of(sock, HEAD_S / 2))
    assert status == 431
    assert f"larger than {MAX_HEAD_BYTES} bytes" in body["error"]
    after = counter(guarded.url, "duoserve_rejected_connections_total", "head_too_large")
    assert after - before == 1


def test_a_whole_head_over_the_limit_in_one_write_gets_431(guarded: Gateway) -> None:
    """A head that arrives complete in one read, over the limit: refused before it is parsed,
    on a fresh connection and on one kept alive after a normal request (found by sending a
    100 KB header in one write, which was answered 200)."""
    before = counter(guarded.url, "duoserve_rejected_connections_total", "head_too_large")
    big = b"GET /v2 HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 3 * MAX_HEAD_BYTES + b"\r\n\r\n"
    with connect(guarded) as sock:
        sock.sendall(big)
        status, _, body = status_and_body(answer_of(sock, HEAD_S / 2))
    assert status == 431
    assert f"larger than {MAX_HEAD_BYTES} bytes" in body["error"]
    with connect(guarded) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert one_answer(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\r\n" + big)  # blank lines first, which llhttp skips: still counted
        status, _, body = status_and_body(answer_of(sock, HEAD_S / 2))
    assert status == 431
    # One just under the limit, with a body in the same write, is served.
    with connect(guarded) as sock:
        filler = b"a" * (MAX_HEAD_BYTES - 200)
        padded = BODY + b" " * 2 * MAX_HEAD_BYTES  # JSON may end in white space
        sock.sendall(
            b"POST "
            + INFER.encode()
            + b" HTTP/1.1\r\nHost: gateway\r\nX-Filler: "
            + filler
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(padded)).encode()
            + b"\r\n\r\n"
            + padded
        )
        assert one_answer(sock).startswith(b"HTTP/1.1 200")
    after = counter(guarded.url, "duoserve_rejected_connections_total", "head_too_large")
    assert after - before == 2


def test_the_431_check_counts_only_the_head(guarded: Gateway) -> None:
    """What the check before parsing must not count as head, or miss (found in review): the
    rest of a body answered early, a head's blank line split across two reads, and leading
    blank lines in front of a fresh connection's first head."""
    before = counter(guarded.url, "duoserve_rejected_connections_total", "head_too_large")
    # A body the gateway answered before reading it (415), then sent whole in one write: the
    # next request on the connection is a normal one, served.
    with connect(guarded) as sock:
        length = 4 * MAX_HEAD_BYTES
        sock.sendall(
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: text/html\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n"
        )
        assert one_answer(sock).startswith(b"HTTP/1.1 415")
        sock.sendall(b"x" * length)
        time.sleep(0.3)  # the body's last read apart from the next head
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert one_answer(sock).startswith(b"HTTP/1.1 200")
    # A head whose blank line straddles two reads, then a body with a blank line of its own
    # far past the limit: the head is small, the request is served.
    with connect(guarded) as sock:
        padded = BODY + b"\r\n\r\n" + b" " * 3 * MAX_HEAD_BYTES  # JSON white space
        sock.sendall(
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(padded)).encode()
            + b"\r\n"
        )
        time.sleep(0.3)
        sock.sendall(b"\r\n" + padded)
        assert one_answer(sock).startswith(b"HTTP/1.1 200")
    # Blank lines first on a fresh connection, then a whole head over the limit: refused.
    with connect(guarded) as sock:
        sock.sendall(
            b"\r\n\r\nGET /v2 HTTP/1.1\r\nHost: gateway\r\nX-Big: "
            + b"a" * 3 * MAX_HEAD_BYTES
            + b"\r\n\r\n"
        )
        status, _, _ = status_and_body(answer_of(sock, HEAD_S / 2))
    assert status == 431
    after = counter(guarded.url, "duoserve_rejected_connections_total", "head_too_large")
    assert after - before == 1


def test_connections_past_the_cap_get_503_at_once_until_idle_ones_time_out(
    guarded: Gateway,
) -> None:
    refused_before = counter(guarded.url, "duoserve_rejected_connections_total", "connection_limit")
    timeouts_before = counter(guarded.url, "duoserve_client_timeouts_total", "head")
    with NormalClient(guarded.url) as normal:
        # More silent connections than the cap; the normal client's connection holds a slot.
        idle = [connect(guarded) for _ in range(MAX_CONNECTIONS + 10)]
        try:
            # A real client on a new connection now is refused at once, not left waiting.
            late = httpx.post(guarded.url + INFER, content=BODY, timeout=HEAD_S)
            assert late.status_code == 503
            assert "too many open connections" in late.json()["error"]
            # Each one ends one way or the other without sending a byte: a 503 at once past
            # the cap, a close at the head deadline within it.
            endings = {sock: answer_of(sock, HEAD_S + MARGIN_S) for sock in idle}
        finally:
            for sock in idle:
                sock.close()
        refused = [answer for answer in endings.values() if answer]
        accepted = len(idle) - len(refused)
        assert 0 < accepted <= MAX_CONNECTIONS - 1
        for answer in refused:
            status, headers, body = status_and_body(answer)
            assert status == 503
            assert headers["retry-after"] == "1"
            assert "too many open connections" in body["error"]
        # The slots are free again: a new connection is served.
        assert httpx.post(guarded.url + INFER, content=BODY, timeout=10).status_code == 200
    normal.served_throughout()
    refused_now = counter(guarded.url, "duoserve_rejected_connections_total", "connection_limit")
    assert refused_now - refused_before == len(refused) + 1  # the late client too
    timeouts_now = counter(guarded.url, "duoserve_client_timeouts_total", "head")
    assert timeouts_now - timeouts_before == accepted
