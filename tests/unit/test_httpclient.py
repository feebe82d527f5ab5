"""The gateway's HTTP/1.1 client (backends/httpclient.py) against a scripted server on a real
socket: keep-alive reuse, every way an answer can be delimited, every way a call can fail
without poisoning the next one, and hostile servers (closing a connection as it is reused,
cutting an answer short, never ending a header line, answering HEAD with a length)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from duoserve.backends.http import call
from duoserve.backends.httpclient import (
    MAX_HEAD_BYTES,
    ConnectError,
    ConnectionLostError,
    HTTPPool,
    PoolClosedError,
    ProtocolError,
    ReplyCutShortError,
)
from duoserve.errors import Unavailable, UpstreamError
from duoserve.resilience import Deadline
from tests.servers import free_port
from tests.timing import eventually

# A handler gets (method, target, headers, body) and returns raw bytes to write, None to close
# the connection without answering, (bytes, "reset") to write then reset the connection, or
# (bytes, "hold") to write then keep the connection open without another byte; it may sleep
# first.
Handler = Callable[[str, str, dict[str, str], bytes], "asyncio.Future[bytes | None] | object"]


def ok(body: bytes, *extra: str) -> bytes:
    head = "\r\n".join(["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra])
    return head.encode() + b"\r\n\r\n" + body


class Scripted:
    """A tiny HTTP/1.1 server whose answers the test writes; counts connections."""

    def __init__(self, handler: Callable[..., object], at_reuse: str | None = None) -> None:
        self.handler = handler
        # "close" or "reset": a connection's second and later requests are read, then the
        # connection is closed (or reset) without a byte of answer, as a server whose idle
        # timeout fires just as the client reuses the connection.
        self.at_reuse = at_reuse
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        served = 0
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, value = header.decode().split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, target, headers, body))
                served += 1
                if served > 1 and self.at_reuse is not None:
                    if self.at_reuse == "reset":
                        reset(writer)
                    return
                answer = self.handler(method, target, headers, body)
                if asyncio.iscoroutine(answer):
                    answer = await answer
                if answer is None:
                    return
                if isinstance(answer, tuple):  # (bytes, "reset" or "hold")
                    writer.write(answer[0])
                    await writer.drain()
                    if answer[1] == "hold":
                        await reader.read()  # until the client gives up and closes
                        return
                    await asyncio.sleep(0.05)
                    reset(writer)
                    return
                writer.write(answer)  # type: ignore[arg-type]
                await writer.drain()
                if b"Connection: close" in answer:  # type: ignore[operator]
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # Cancelled at teardown: end quietly (3.11's start_server callback would log a
            # cancelled handler as an error).
            return
        finally:
            self.open_now -= 1
            writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """End the connection with a TCP reset instead of a close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@asynccontextmanager
async def scripted(
    handler: Callable[..., object], at_reuse: str | None = None
) -> AsyncIterator[tuple[Scripted, str]]:
    server = Scripted(handler, at_reuse)
    port = free_port()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", port)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        listener.close()


def echo(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
    return ok(f"{method} {target} {len(body)}".encode(), "Content-Type: text/plain")


async def test_requests_reuse_kept_alive_connections_and_send_what_was_asked() -> None:
    async with scripted(echo) as (server, url):
        pool = HTTPPool(url + "/prefix/", 4)
        replies = [
            await pool.request(
                "POST", f"/m/{i}", body=b"x" * i, headers={"X-Key": "v"}, timeout_s=2
            )
            for i in range(20)
        ]
        assert [r.body for r in replies] == [f"POST /prefix/m/{i} {i}".encode() for i in range(20)]
        assert all(r.status == 200 for r in replies)
        assert replies[0].headers["content-type"] == "text/plain"
        assert server.connections == 1  # one after another: one connection, kept alive
        method, target, headers, body = server.requests[3]
        assert headers["x-key"] == "v"
        assert headers["host"] == url.removeprefix("http://")
        assert headers["content-length"] == "3"
        get = await pool.request("GET", "/status", timeout_s=2)
        assert get.body == b"GET /prefix/status 0"
        assert "content-length" not in server.requests[-1][2]
        await pool.close()


async def test_concurrent_requests_never_open_more_than_the_limit() -> None:
    async def slow(*args: object) -> bytes:
        await asyncio.sleep(0.02)
        return ok(b"done")

    async with scripted(slow) as (server, url):
        pool = HTTPPool(url, 3)
        replies = await asyncio.gather(
            *(pool.request("POST", "/x", body=b"{}", timeout_s=5) for _ in range(30))
        )
        assert [r.body for r in replies] == [b"done"] * 30
        assert server.most_open <= 3
        assert server.connections == 3
        await pool.close()


async def test_chunked_eof_delimited_and_interim_answers_are_read_whole() -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after interim"),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the server closes",
            ok(b"on a new connection"),
        ]
    )

    async with scripted(lambda *a: next(answers)) as (server, url):
        pool = HTTPPool(url, 2)
        bodies = [(await pool.request("GET", "/", timeout_s=2)).body for _ in range(4)]
        assert bodies == [
            b"hello world",
            b"after interim",
            b"until the server closes",
            b"on a new connection",
        ]
        assert server.connections == 2  # the close-delimited answer ended its connection
        await pool.close()


async def test_a_timed_out_call_never_hands_its_late_answer_to_the_next() -> None:
    late_answer_sent = asyncio.Event()

    async def answer(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        if target == "/slow":
            await asyncio.sleep(0.3)
            late_answer_sent.set()  # written as this returns, before the test runs again
        return ok(target.encode())

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        with pytest.raises(TimeoutError):
            await pool.request("GET", "/slow", timeout_s=0.05)
        reply = await pool.request("GET", "/fast", timeout_s=2)
        assert reply.body == b"/fast"
        await late_answer_sent.wait()  # the late answer goes out on the abandoned connection
        assert (await pool.request("GET", "/again", timeout_s=2)).body == b"/again"
        await pool.close()


async def test_cancelled_and_waiting_calls_leave_no_slot_behind() -> None:
    async def slow(*args: object) -> bytes:
        await asyncio.sleep(0.2)
        return ok(b"late")

    async with scripted(slow) as (server, url):
        pool = HTTPPool(url, 2)
        calls = [asyncio.ensure_future(pool.request("GET", "/", timeout_s=5)) for _ in range(6)]
        await eventually(lambda: len(server.requests) == 2, "two calls sent, four waiting")
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        replies = await asyncio.gather(*(pool.request("GET", "/", timeout_s=5) for _ in range(4)))
        assert [r.body for r in replies] == [b"late"] * 4
        # The two cancelled calls' connections were dropped, two new ones served the rest.
        assert server.connections == 4
        await pool.close()


async def test_failures_are_named_and_the_pool_recovers() -> None:
    def answer(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes | None:
        if target == "/drop":
            return None  # close without a word
        if target == "/half":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
        if target == "/garbage":
            return b"SMTP ready\r\n\r\n"
        if target == "/huge":
            return ok(b"x" * 5000)
        return ok(b"fine")

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 2, max_response_bytes=1000)
        with pytest.raises(ConnectionLostError):
            await pool.request("GET", "/drop", timeout_s=2)
        with pytest.raises(ProtocolError, match="not valid HTTP"):
            await pool.request("GET", "/garbage", timeout_s=2)
        with pytest.raises(ProtocolError, match="larger than 1000 bytes"):
            await pool.request("GET", "/huge", timeout_s=2)
        half = asyncio.ensure_future(pool.request("GET", "/half", timeout_s=0.3))
        with pytest.raises(TimeoutError):
            await half
        for _ in range(3):
            assert (await pool.request("GET", "/ok", timeout_s=2)).body == b"fine"
        await pool.close()
        with pytest.raises(PoolClosedError):
            await pool.request("GET", "/ok", timeout_s=2)


async def test_refused_connection_and_bad_input() -> None:
    pool = HTTPPool(f"http://127.0.0.1:{free_port()}", 2)
    with pytest.raises(ConnectError):
        await pool.request("GET", "/", timeout_s=2)
    with pytest.raises(ValueError, match="line break"):
        await pool.request("GET", "/", headers={"X": "a\r\nInjected: 1"}, timeout_s=2)
    with pytest.raises(ValueError, match="not an http"):
        HTTPPool("ftp://host", 1)
    await pool.close()


async def test_idle_connections_past_keepalive_are_not_reused() -> None:
    async with scripted(echo) as (server, url):
        pool = HTTPPool(url, 2, keepalive_s=0.05)
        await pool.request("GET", "/", timeout_s=2)
        await asyncio.sleep(0.1)
        await pool.request("GET", "/", timeout_s=2)
        assert server.connections == 2
        await pool.close()


async def test_a_reset_cuts_an_eof_delimited_answer_short_and_is_not_a_success() -> None:
    def answer(*args: object) -> tuple[bytes, str]:
        return (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart of it", "reset")

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        with pytest.raises(ReplyCutShortError):
            await pool.request("GET", "/", timeout_s=2)
        await pool.close()


async def test_bytes_beyond_the_declared_answer_retire_the_connection() -> None:
    # A backend that writes two answers for one request: the second must never be read as
    # the answer to the next request.
    def answer(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        return ok(target.encode()) + ok(b"stray")

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        assert (await pool.request("GET", "/one", timeout_s=2)).body == b"/one"
        assert (await pool.request("GET", "/two", timeout_s=2)).body == b"/two"
        assert server.connections == 2
        await pool.close()


async def test_endless_headers_are_refused() -> None:
    def answer(*args: object) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"y" * 70_000 + b"\r\n\r\n"

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        with pytest.raises(ProtocolError, match="headers"):
            await pool.request("GET", "/", timeout_s=2)
        await pool.close()


async def test_a_connection_closed_as_it_is_reused_is_retried_once_on_a_fresh_one() -> None:
    for how in ("close", "reset"):
        async with scripted(echo, at_reuse=how) as (server, url):
            pool = HTTPPool(url, 1)
            bodies = [
                (await pool.request("POST", f"/{i}", body=b"x", timeout_s=2)).body for i in range(3)
            ]
            assert bodies == [b"POST /0 1", b"POST /1 1", b"POST /2 1"]
            # Each reuse met a closing server; each call went again on a new connection.
            assert server.connections == 3
            assert [target for _, target, _, _ in server.requests] == ["/0", "/1", "/1", "/2", "/2"]
            await pool.close()


async def test_a_fresh_connection_that_dies_is_reported_not_retried() -> None:
    async with scripted(lambda *a: None) as (server, url):
        pool = HTTPPool(url, 1)
        with pytest.raises(ConnectionLostError):
            await pool.request("POST", "/x", body=b"{}", timeout_s=2)
        assert len(server.requests) == 1
        await pool.close()
    # Through call(): not processed, so the data plane may retry or fail over (503).
    async with scripted(lambda *a: None) as (server, url):
        pool = HTTPPool(url, 1)
        with pytest.raises(Unavailable) as caught:
            await call(pool, "POST", "/x", what="test", deadline=Deadline(2), body=b"{}")
        assert caught.value.status == 503
        assert caught.value.reason == "backend_down"
        await pool.close()


async def test_the_retry_happens_once_and_then_reports() -> None:
    # The first connection serves one request; every later request meets a closing server.
    first = True

    def answer(*args: object) -> bytes | None:
        nonlocal first
        if first:
            first = False
            return ok(b"one")
        return None

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        assert (await pool.request("GET", "/", timeout_s=2)).body == b"one"
        with pytest.raises(ConnectionLostError):
            await pool.request("GET", "/", timeout_s=2)
        assert len(server.requests) == 3  # the first, the reused try, one fresh retry
        assert server.connections == 2
        await pool.close()


async def test_an_answer_cut_in_the_middle_is_a_backend_error_never_retried() -> None:
    def answer(method: str, target: str, headers: dict[str, str], body: bytes) -> object:
        if target == "/cut":
            # 9 of 100 bytes, then the server closes.
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly part"
        return ok(b"fine")

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        assert (await pool.request("GET", "/ok", timeout_s=2)).body == b"fine"
        with pytest.raises(ReplyCutShortError):
            await pool.request("GET", "/cut", timeout_s=2)  # on the reused connection
        assert len(server.requests) == 2  # ran once: the backend did the work
        # Through call(): an upstream failure (502), not "backend down, not processed".
        with pytest.raises(UpstreamError) as caught:
            await call(pool, "GET", "/cut", what="test", deadline=Deadline(2))
        assert caught.value.status == 502
        assert caught.value.reason == "backend_error"
        assert "middle of its answer" in caught.value.message
        assert (await pool.request("GET", "/ok", timeout_s=2)).body == b"fine"
        await pool.close()


async def test_a_header_line_that_never_ends_fails_at_the_head_limit() -> None:
    # No line end, and the connection stays open: only the head limit can end the call (the
    # body limit is 256 MiB by default, and the timeout is far away).
    def answer(*args: object) -> tuple[bytes, str]:
        return (b"HTTP/1.1 200 OK\r\nX-Filler: " + b"y" * (MAX_HEAD_BYTES + 1000), "hold")

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        with pytest.raises(ProtocolError, match="headers exceed"):
            await pool.request("GET", "/", timeout_s=30)
        await pool.close()


async def test_head_answers_have_no_body_whatever_their_length_says() -> None:
    def answer(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        if method == "HEAD":
            length = "0" if target == "/empty" else "1234"
            return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nX-Kind: head\r\n\r\n".encode()
        return ok(b"got " + target.encode())

    async with scripted(answer) as (server, url):
        pool = HTTPPool(url, 1)
        reply = await pool.request("HEAD", "/big", timeout_s=5)
        assert (reply.status, reply.body) == (200, b"")
        assert reply.headers["content-length"] == "1234"
        assert reply.headers["x-kind"] == "head"
        # The next call is not fed the parser's idea of a 1234-byte body.
        assert (await pool.request("GET", "/next", timeout_s=5)).body == b"got /next"
        reply = await pool.request("HEAD", "/empty", timeout_s=5)
        assert (reply.status, reply.body) == (200, b"")
        assert (await pool.request("GET", "/after", timeout_s=5)).body == b"got /after"
        # A HEAD answer whose length the parser still awaits retires its connection; one that
        # the parser saw end (length 0) keeps it.
        assert server.connections == 2
        await pool.close()
