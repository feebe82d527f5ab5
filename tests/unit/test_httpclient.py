"""The gateway's HTTP/1.1 client (backends/httpclient.py) against a scripted server on a real
socket: keep-alive reuse, every way an answer can be delimited, and every way a call can fail
without poisoning the next one."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from duoserve.backends.httpclient import (
    ConnectError,
    ConnectionLostError,
    HTTPPool,
    PoolClosedError,
    ProtocolError,
)
from tests.servers import free_port
from tests.timing import eventually

# A handler gets (method, target, headers, body) and returns raw bytes to write, or None to
# close the connection without answering; it may sleep first.
Handler = Callable[[str, str, dict[str, str], bytes], "asyncio.Future[bytes | None] | object"]


def ok(body: bytes, *extra: str) -> bytes:
    head = "\r\n".join(["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra])
    return head.encode() + b"\r\n\r\n" + body


class Scripted:
    """A tiny HTTP/1.1 server whose answers the test writes; counts connections."""

    def __init__(self, handler: Callable[..., object]) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
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
                answer = self.handler(method, target, headers, body)
                if asyncio.iscoroutine(answer):
                    answer = await answer
                if answer is None:
                    return
                if isinstance(answer, tuple):  # (bytes, "reset"): write, then reset the TCP
                    writer.write(answer[0])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
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


@asynccontextmanager
async def scripted(handler: Callable[..., object]) -> AsyncIterator[tuple[Scripted, str]]:
    server = Scripted(handler)
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
        with pytest.raises(ConnectionLostError):
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
