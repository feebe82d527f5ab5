"""A small keep-alive HTTP/1.1 client for the gateway's calls to its backends.

Why not aiohttp: measured here against a backend that answers at once, one aiohttp
``session.post`` + ``read()`` costs ~150 us of CPU, this client ~45 us (both with uvloop);
behind a gateway that spends ~400 us per request in all, that is the largest single saving left.
The gateway needs little of what a general client does: one origin per pool, requests with a
known body, answers read whole into memory, no cookies, redirects, proxies or decompression.

- One ``HTTPPool`` per backend: at most ``max_connections`` connections, reused LIFO while the
  server keeps them alive; idle ones are dropped after ``keepalive_s`` (shorter than the servers'
  own idle timeouts, so a request rarely meets a connection the server is closing).
- Responses are parsed by httptools (llhttp, as uvicorn uses): Content-Length, chunked, or
  read until the server closes; 1xx interim answers are skipped; a status line and headers
  beyond ``MAX_HEAD_BYTES`` (finished or not) and bodies beyond ``max_response_bytes`` fail the
  call instead of filling memory. The answer to a HEAD request has no body, whatever its
  Content-Length says.
- A call that times out, is cancelled or fails mid-way closes its connection: a late answer can
  never be read as the next request's.
- A kept-alive connection the server closes just as a request is written on it (its idle
  timeout fired first) is the one failure retried here: once, on a fresh connection, and only
  when not one byte of an answer came back (RFC 9112 section 9.3.1, RFC 9110 section 9.2.2).
  Every call the gateway makes is safe to repeat (inference, readiness, metadata have no side
  effects), and a server that closes before reading a request never ran it. A fresh connection
  that dies is reported, never retried: nothing says the next one would fare better.
- Errors: ``ConnectError`` (could not connect: nothing was sent), ``ConnectionLostError`` (the
  server closed before any byte of an answer), ``ReplyCutShortError`` (the connection was lost
  after the answer began: the server did run the request), ``ProtocolError`` (not HTTP/1.x,
  or too large); ``TimeoutError`` past ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one answer


class HTTPClientError(Exception):
    """The call failed before a complete answer was read."""


class ConnectError(HTTPClientError):
    """No connection could be opened (refused, unresolvable, TLS failure): nothing was sent."""


class ConnectionLostError(HTTPClientError):
    """The server closed the connection before any byte of its answer came back."""


class ReplyCutShortError(HTTPClientError):
    """The connection was lost after the answer began: the server ran the request, and its
    answer is incomplete."""


class ProtocolError(HTTPClientError):
    """The answer was not valid HTTP/1.x, or larger than the pool accepts."""


class PoolClosedError(HTTPClientError):
    """The pool was closed (the gateway is shutting down)."""


@dataclass(slots=True)
class Reply:
    """A complete answer: status, headers (names lowercased; the last of repeated ones), body."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection; one request at a time (no pipelining)."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self.keep_alive = False
        self.idle_since = 0.0
        self.reused = False  # has carried an answer before: the server may be closing it
        self.answer_began = False  # a byte of the current request's answer came back
        self.head_only = False  # the current request is HEAD: its answer has no body
        self._status = 0
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._delimited = False  # Content-Length or chunked: the end is known without EOF
        self._head_bytes = 0
        self._read_before_body = 0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self.answer_began = True
        head_pending = not self._headers_done
        if head_pending:
            self._read_before_body += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            # httptools wraps a callback's exception in its own (HttpParserCallbackError).
            if isinstance(error.__context__, _BodyTooLarge):
                self._fail(ProtocolError(f"the answer is larger than {self.max_body} bytes"))
            elif isinstance(error.__context__, _HeadTooLarge):
                self._fail(ProtocolError(f"the answer's headers exceed {MAX_HEAD_BYTES} bytes"))
            else:
                self._fail(ProtocolError(f"the answer is not valid HTTP: {error}"))
            return
        # on_header sees only whole lines: a status or header line that never ends is caught
        # here. Every byte read while the head is still unfinished after feeding belongs to it.
        if head_pending and not self._headers_done and self._read_before_body > MAX_HEAD_BYTES:
            self._fail(ProtocolError(f"the answer's headers exceed {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if exc is None and self._headers_done and not self._delimited and not self._bodiless():
            self._complete()  # an answer delimited by the server closing the connection
        elif self.answer_began:
            waiter.set_exception(ReplyCutShortError("the connection broke during the answer"))
        else:
            waiter.set_exception(ConnectionLostError("the server closed the connection"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.waiter is None or self.waiter.done():
            # A second answer in the same read (a backend that wrote more than it declared):
            # whatever follows cannot be matched to a request, so the connection is not reused.
            self.keep_alive = False
            self.closed = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = text
        if key == "content-length" or (key == "transfer-encoding" and "chunked" in text.lower()):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        self._headers_done = True
        if self.head_only and self._status >= 200:
            # The answer to HEAD ends with its head. httptools cannot tell llhttp so (it would
            # wait for Content-Length bytes that never come): the reply completes here, and the
            # connection is kept only if the parser also saw the message end (no length, or 0).
            self._complete()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            raise _BodyTooLarge
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer (100 Continue): the real one follows
            self._reset()
            return
        self.keep_alive = self.parser.should_keep_alive()
        self._complete()

    # -- requests --------------------------------------------------------------------------

    def _bodiless(self) -> bool:
        return self._status in (204, 304) or 100 <= self._status < 200

    def _reset(self) -> None:
        self._status = 0
        self._headers = {}
        self._chunks = []
        self._size = 0
        self._headers_done = False
        self._delimited = False
        self._head_bytes = 0
        self._read_before_body = 0

    def _complete(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            chunks = self._chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            waiter.set_result(Reply(self._status, self._headers, body))
        self._reset()

    def _fail(self, error: HTTPClientError) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def send(self, data: list[bytes], head_only: bool) -> asyncio.Future[Reply]:
        self.keep_alive = False
        self.answer_began = False
        self.head_only = head_only
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        if not self.usable():
            self.waiter.set_exception(ConnectionLostError("the connection was already closed"))
            return self.waiter
        assert self.transport is not None
        try:
            self.transport.writelines(data)
        except (OSError, RuntimeError) as error:  # uvloop raises on a transport just closed
            self.waiter.set_exception(ConnectionLostError(f"the write failed ({error})"))
        return self.waiter

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _time_out(waiter: asyncio.Future[Reply]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _BodyTooLarge(Exception):
    pass


class _HeadTooLarge(Exception):
    pass


class HTTPPool:
    """Keep-alive connections to one origin (``http://host:port`` or ``https://...``, optionally
    with a path prefix that every request target is appended to)."""

    def __init__(
        self,
        base_url: str,
        max_connections: int,
        *,
        keepalive_s: float = 15.0,
        connect_timeout_s: float = 5.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        address: tuple[str, int] | None = None,
    ) -> None:
        """``address``: connect to this IP and port (one replica of the URL's host) instead of
        resolving the URL's host; the Host header and TLS server name stay the URL's."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        default_port = self.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.connect_to = address or (self.host, self.port)
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.max_response_bytes = max_response_bytes
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or opening, idle included
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float,
    ) -> Reply:
        """One request; ``target`` is the path (and query) below the pool's base URL."""
        head = self._head(method, self.prefix + target, body, headers)
        data = [head, body] if body else [head]
        head_only = method == "HEAD"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # One timer for the whole call. A kept-alive connection is taken without waiting;
        # only opening one, or waiting for one, needs a timeout of its own (to the same end).
        conn = self._idle_connection()
        if conn is None:
            async with asyncio.timeout_at(deadline):
                conn = await self._acquire()
        try:
            reply = await self._exchange(loop, conn, data, head_only, deadline)
        except ConnectionLostError:  # not one byte of an answer came back
            if not conn.reused:
                self._release(conn, False)
                raise
            # The server closed this kept-alive connection as the request went out: once
            # more on a fresh connection, in the same slot (no queueing behind others).
            conn.close()
            async with asyncio.timeout_at(deadline):
                conn = await self._reconnect()
            try:
                reply = await self._exchange(loop, conn, data, head_only, deadline)
            except BaseException:
                self._release(conn, False)
                raise
        except BaseException:
            self._release(conn, False)
            raise
        self._release(conn, conn.keep_alive)
        return reply

    @staticmethod
    async def _exchange(
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        data: list[bytes],
        head_only: bool,
        deadline: float,
    ) -> Reply:
        """Send on ``conn`` and wait for its answer until ``deadline`` (loop time), then
        TimeoutError. A timer that fails the answer's future costs a third of asyncio.timeout
        (no task cancellation to undo); the caller closes the connection either way."""
        waiter = conn.send(data, head_only)
        if waiter.done():
            return waiter.result()
        timer = loop.call_at(deadline, _time_out, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _head(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str] | None
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body) if body else 0}")
        if headers:
            lines.extend(f"{name}: {value}" for name, value in headers.items())
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError("a header or the request target holds a line break")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection still fit for use (stale ones closed)."""
        if self._closed or not self._idle:
            return None
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable() and now - conn.idle_since < self.keepalive_s:
                return conn
            self._discard(conn)
        return None

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise PoolClosedError("the pool is closed")
            idle = self._idle_connection()
            if idle is not None:
                return idle
            if self._open < self.max_connections:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            # At the limit: wait for a released connection, handed over directly (first come,
            # first served), or for a slot to open one (None).
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    given = waiter.result()
                    if given is not None:
                        self._release(given, True)  # not ours after all: to the next in line
                    else:
                        self._wake()  # we were woken but leave: pass the turn on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if handed is not None:
                if handed.usable():
                    return handed
                self._discard(handed)

    async def _reconnect(self) -> _Connection:
        """A fresh connection in the slot of one just closed (still counted in ``_open``)."""
        try:
            if self._closed:
                raise PoolClosedError("the pool is closed")
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_response_bytes),
                    *self.connect_to,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise ConnectError("connecting timed out") from None
        except (OSError, ssl.SSLError) as error:
            raise ConnectError(f"cannot connect ({type(error).__name__})") from None
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not self._closed and conn.usable():
            conn.waiter = None
            conn.reused = True
            conn.idle_since = time.monotonic()
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self._idle.append(conn)
        else:
            self._discard(conn)
            self._wake()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1

    def _wake(self) -> None:
        """Let the first waiter open a connection (one was closed, or a connect failed)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
