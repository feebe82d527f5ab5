"""An answer's head leaves with its first body part, in one write (connections.OneWriteCycle):
what the client gets is unchanged for every kind of answer (with a body, HEAD, 204, a body in
parts, an app failing after its head, keep-alive, pipelining, Expect: 100-continue), through a
real uvicorn server with the gateway's protocol on loopback; and a small answer is one write."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl

from duoserve.connections import GuardedHttpToolsProtocol, HeldHead, OneWriteCycle

BODY = b'{"predictions": [1, 2, 3]}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if path == "/none":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/parts":
        headers = [(b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"01234", "more_body": True})
        await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b"56789"})
        return
    if path == "/fails":
        headers = [(b"content-length", b"100")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        raise RuntimeError("the app fails after its head")
    answer = body or BODY
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@asynccontextmanager
async def server() -> AsyncIterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=GuardedHttpToolsProtocol,  # type: ignore[arg-type]
        ws="none",
        lifespan="off",
        log_level="critical",
    )
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve())
    try:
        while not running.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.01)
        yield port
    finally:
        running.should_exit = True
        await asyncio.wait_for(task, 10)


async def exchange(port: int, data: bytes, until: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` and read until ``until`` has come (or the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        got = b""
        async with asyncio.timeout(timeout_s):
            while until not in got:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
        return got
    finally:
        writer.close()


def head_and_body(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def test_every_kind_of_answer_reaches_the_client_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[tuple[bool, bytes]] = []
    write = HeldHead.write

    def recorded(self: HeldHead, data: bytes) -> None:
        writes.append((self.holding, data))
        write(self, data)

    monkeypatch.setattr(HeldHead, "write", recorded)
    async with server() as port:
        got = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", BODY)
        head, body = head_and_body(got)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 26" in head
        assert body == BODY
        # The server's cycle held the head and sent it with the body.
        assert [held for held, _ in writes] == [True, False] and writes[1][1] == BODY

        # HEAD: no body is written, the head still comes.
        got = await exchange(port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"\r\n\r\n")

        got = await exchange(port, b"GET /none HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 204 No Content")

        # A body in two parts, a pause between: the head comes with the first.
        got = await exchange(port, b"GET /parts HTTP/1.1\r\nHost: x\r\n\r\n", b"56789")
        assert head_and_body(got) == (head_and_body(got)[0], b"0123456789")

        # The app fails after its head: the client gets the head, then the connection closes
        # (uvicorn's answer before this change too: the body can no longer be framed).
        got = await exchange(port, b"GET /fails HTTP/1.1\r\nHost: x\r\n\r\n", b"never")
        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"\r\n\r\n")


async def test_keep_alive_pipelining_and_100_continue_keep_working() -> None:
    async with server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Two requests in one write, then a third on the same connection.
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
                         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ntwo")  # fmt: skip
            got = b""
            async with asyncio.timeout(5):
                while got.count(b"HTTP/1.1 200") < 2 or not got.endswith(b"two"):
                    got += await reader.read(65536)
            assert got.index(b"one") < got.index(b"two")
            # Expect: 100-continue: the interim answer must come before the body is sent.
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         b"Expect: 100-continue\r\n\r\n")  # fmt: skip
            async with asyncio.timeout(5):
                interim = await reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"three")
            got = b""
            async with asyncio.timeout(5):
                while not got.endswith(b"three"):
                    got += await reader.read(65536)
            assert got.startswith(b"HTTP/1.1 200 OK")
        finally:
            writer.close()


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def cycle(transport: RecordingTransport, keep_alive: bool = True) -> OneWriteCycle:
    made = OneWriteCycle(
        scope={"method": "POST", "type": "http"},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )
    made.transport = HeldHead(transport)  # type: ignore[arg-type]
    return made


async def test_a_small_answer_is_one_write_and_a_closing_one_is_written_before_the_close() -> None:
    for keep_alive in (True, False):
        transport = RecordingTransport()
        answer = cycle(transport, keep_alive)
        headers = [(b"content-length", b"26")]
        await answer.send({"type": "http.response.start", "status": 200, "headers": headers})
        assert transport.writes == []
        await answer.send({"type": "http.response.body", "body": BODY})
        assert len(transport.writes) == 1
        head, body = head_and_body(transport.writes[0])
        assert head.startswith(b"HTTP/1.1 200 OK") and body == BODY
        assert transport.closed is not keep_alive
