"""Slow, idle and oversized clients, handled where uvicorn reads each connection.

uvicorn 0.54 (httptools) times out only the idle wait between two keep-alive requests
(``timeout_keep_alive``). A client that sends its head or its body slowly, or connects and sends
nothing, holds its connection (a file descriptor, its buffers) for as long as it likes; a head
of any size is taken into memory; and nothing caps how many connections a worker keeps.
``GuardedHttpToolsProtocol`` is uvicorn's ``HttpToolsProtocol`` (``http=`` of uvicorn.Config,
set by ``duoserve serve``) plus, with the limits of a ``ConnectionGuard``:

- the head (request line and headers) must be complete within ``header_timeout_s`` of the
  connection opening (first request) or of its own first byte (later ones), else 408; a
  connection that never sent a byte is closed without an answer (nginx's client_header_timeout,
  Go's ReadHeaderTimeout). A head beyond ``max_head_bytes`` gets 431.
- the body must keep coming: at most ``body_idle_s`` between two reads (nginx's
  client_body_timeout) and ``body_total_s`` in all, else 408 (or the connection closed, where
  the app has already begun an answer). While the server itself has stopped reading (flow
  control: the app has not yet taken what was read), the client is not waiting on.
- past ``max_connections`` open connections in this worker, a new one is answered 503 and
  closed at once, before it can hold anything.

Why here and not in ASGI middleware: a head that never ends never reaches the app, and a
receive() timeout would cost a timer (or a task) per request. Here a connection has at most one
timer, armed only when a read leaves a head or a body unfinished; the first request's head timer
is armed when the connection opens. A request whose head and body come in one read, nearly every
inference POST, arms none and costs a few attribute updates.

The guard reaches each connection through the ASGI lifespan state (``create_app`` yields it
under ``GUARD_STATE_KEY``; uvicorn hands that state to every protocol it creates). Without one
(another app, or lifespan off) the protocol is plain uvicorn.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from starlette.types import Scope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from duoserve.errors import DuoServeError, HeadersTooLarge, Overloaded, RequestTimeout
from duoserve.frontends.http import request_id
from duoserve.metrics import Metrics
from duoserve.settings import Settings

GUARD_STATE_KEY = "duoserve.connection_guard"

# What a connection waits for from its client; nothing while a request is being answered or
# between keep-alive requests (uvicorn's own keep-alive timeout covers that wait).
_NOTHING, _HEAD, _BODY = 0, 1, 2


@dataclass(slots=True)
class ConnectionGuard:
    """The limits every client connection of one worker is held to, and their metrics."""

    header_timeout_s: float
    body_idle_s: float
    body_total_s: float
    max_head_bytes: int
    max_connections: int
    metrics: Metrics
    render: Callable[[Scope | None, DuoServeError], bytes]
    """The error body for a request (its front door's shape; the default with no request)."""
    open_connections: Any = field(init=False, default=None)
    """The duoserve_client_connections gauge."""

    def __post_init__(self) -> None:
        self.open_connections = self.metrics.client_connections.labels()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        metrics: Metrics,
        render: Callable[[Scope | None, DuoServeError], bytes],
    ) -> ConnectionGuard:
        return cls(
            header_timeout_s=settings.client_header_timeout_s,
            body_idle_s=settings.client_body_timeout_s,
            body_total_s=settings.client_body_total_s,
            max_head_bytes=settings.max_head_bytes,
            max_connections=settings.max_connections,
            metrics=metrics,
            render=render,
        )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with deadlines for a request's head and body, a head size
    limit and a cap on open connections (see the module's docstring). Run it with ``ws="none"``
    (as ``duoserve serve`` does): a connection handed to a WebSocket protocol would leave its
    timer behind."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard: ConnectionGuard | None = app_state.get(GUARD_STATE_KEY)
        self._awaiting = _NOTHING
        self._began = False  # a byte of the awaited request came
        self._since = 0.0  # when the awaited head (or body) began
        self._last_read = 0.0
        self._head_read = 0  # bytes read while the head is unfinished
        # A read longer than this may complete a head over the limit: looked at before parsing.
        self._max_head = self.guard.max_head_bytes if self.guard is not None else sys.maxsize
        self._tail = b""  # the last bytes of a read that left a head unfinished
        self._counted = False  # in the open-connections gauge
        self._deadline: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        if guard is None:
            return
        if len(self.connections) > guard.max_connections:
            guard.metrics.rejected_connections.labels("connection_limit").inc()
            error = Overloaded("the gateway has too many open connections; retry shortly")
            self._answer_and_close(error, guard.render(None, error))
            return
        guard.open_connections.inc()
        self._counted = True
        self._awaiting = _HEAD
        self._since = self._last_read = self.loop.time()
        self._deadline = self.loop.call_at(self._since + guard.header_timeout_s, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._counted and self.guard is not None:
            self._counted = False
            self.guard.open_connections.dec()
        super().connection_lost(exc)

    # The callbacks below run for every request: the parent's methods are called directly
    # (cheaper than super()), and the bookkeeping is a few attribute updates.

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if self._awaiting == _HEAD:
            # Bytes of this request's head read before: none until its first byte came (blank
            # lines before a request are not part of its head).
            before = self._head_read if self._began else 0
            self._head_read += len(data)
            if before + len(data) > self._max_head and self._head_ends_late(data, before):
                return
        elif not self._awaiting and len(data) > self._max_head:
            if self._head_ends_late(data, 0):
                return
        HttpToolsProtocol.data_received(self, data)
        guard = self.guard
        if guard is None or self.transport.is_closing():
            return
        if self._awaiting == _HEAD:
            # Only a head still unfinished once the read is parsed is measured (a read that
            # completed the head may hold a body too).
            if self._head_read > guard.max_head_bytes:
                self._refuse_head(guard)
                return
            self._tail = data[-3:]  # where the head's blank line may begin, for the next read
        elif not self._awaiting:
            cycle = self.cycle
            if cycle is None or not cycle.response_complete:
                return  # a request is being answered: nothing is awaited from the client
            # Bytes between requests that begin none (blank lines, which llhttp skips, or the
            # rest of a body answered early): they stopped uvicorn's keep-alive timer, so they
            # start the next head's time. Not its size: none of them is part of that head.
            self._awaiting = _HEAD
            self._since = self._last_read
            self._head_read = 0
        if self._deadline is None:
            self._arm(guard)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        if self._awaiting != _HEAD:  # a later request: its head's time runs from this byte
            self._awaiting = _HEAD
            self._since = self._last_read
            self._head_read = 0
        self._began = True

    def on_headers_complete(self) -> None:
        self._awaiting = _BODY
        self._since = self._last_read
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._awaiting = _NOTHING
        self._began = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # -- deadlines -------------------------------------------------------------------------

    def _arm(self, guard: ConnectionGuard) -> None:
        if self._awaiting == _HEAD:
            when = self._since + guard.header_timeout_s
        else:
            when = min(self._since + guard.body_total_s, self._last_read + guard.body_idle_s)
        self._deadline = self.loop.call_at(when, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        guard = self.guard
        if guard is None or not self._awaiting or self.transport.is_closing():
            return
        now = self.loop.time() + 0.001  # a timer may fire a hair early; never re-arm for that
        if self._awaiting == _HEAD:
            if now < self._since + guard.header_timeout_s:
                self._arm(guard)
                return
            guard.metrics.client_timeouts.labels("head").inc()
            if self._earlier_answer_pending():
                self.transport.close()
            elif self._began:
                error = RequestTimeout(
                    f"the request head did not arrive within {guard.header_timeout_s:g} s"
                )
                self._answer_and_close(error, guard.render(None, error))
            else:
                self.transport.close()  # not a byte came: there is no request to answer
            return
        if self.flow.read_paused:
            # The server stopped reading (the app has not taken what was read): not the
            # client's delay. Looked at again one pause later.
            self._last_read = now
            self._deadline = self.loop.call_at(now + guard.body_idle_s, self._expired)
            return
        if now >= self._since + guard.body_total_s:
            reason, limit = "body_total", f"within {guard.body_total_s:g} s"
        elif now >= self._last_read + guard.body_idle_s:
            reason, limit = "body_idle", f"(no byte for {guard.body_idle_s:g} s)"
        else:
            self._arm(guard)
            return
        guard.metrics.client_timeouts.labels(reason).inc()
        cycle = self.cycle
        if self._earlier_answer_pending() or cycle.response_started:
            self.transport.close()  # an answer is already under way: none can be framed now
            return
        # The app is waiting in receive() (or has not asked yet): it is told the client left,
        # and anything it still sends goes nowhere.
        cycle.disconnected = True
        cycle.message_event.set()
        error = RequestTimeout(f"the request body did not arrive {limit}")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.scope["headers"]}
        error.headers = {"x-request-id": request_id(headers)}
        # uvicorn types the scope as a TypedDict; it is the dict the app got (and matched).
        self._answer_and_close(error, guard.render(cast(Scope, self.scope), error))

    def _earlier_answer_pending(self) -> bool:
        """A pipelined request's head or body is late while an earlier one is still answered:
        a 408 cannot be written before that answer, so the connection is just closed."""
        if self._awaiting == _HEAD:
            return self.cycle is not None and not self.cycle.response_complete
        return bool(self.pipeline)

    def _head_ends_late(self, data: bytes, before: int) -> bool:
        """Before parsing a read that may take the head past the limit (``before``: bytes of
        the head read earlier): whether the head ends in this read over the limit, and if so
        refuse it. The head is measured to its blank line, which may begin in the previous
        read; blank lines before a request do not count. A head still unfinished after the
        read is refused once parsed (data_received)."""
        guard = self.guard
        if guard is None:
            return False
        if self._began:  # the head began earlier: its blank line may straddle the two reads
            tail = self._tail
            end = (tail + data).find(b"\r\n\r\n")
            if end < 0:
                return False  # unfinished: measured after parsing
            size = before + end + 4 - len(tail)
        else:
            start = len(data) - len(data.lstrip(b"\r\n"))
            end = data.find(b"\r\n\r\n", start)
            if end < 0:
                return False
            size = end + 4 - start
        if size <= guard.max_head_bytes:
            return False
        self._awaiting = _HEAD
        self._refuse_head(guard)
        return True

    def _refuse_head(self, guard: ConnectionGuard) -> None:
        guard.metrics.rejected_connections.labels("head_too_large").inc()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._earlier_answer_pending():
            self.transport.close()
            return
        error = HeadersTooLarge(f"the request head is larger than {guard.max_head_bytes} bytes")
        self._answer_and_close(error, guard.render(None, error))

    def _answer_and_close(self, error: DuoServeError, body: bytes) -> None:
        self._awaiting = _NOTHING
        lines = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            lines.extend([name, b": ", value, b"\r\n"])
        headers = {
            "content-type": "application/json",
            "content-length": str(len(body)),
            "connection": "close",
            **error.headers,
        }
        for key, text in headers.items():
            lines.append(f"{key}: {text}\r\n".encode("latin-1"))
        lines.extend([b"\r\n", body])
        self.transport.write(b"".join(lines))
        self.transport.close()
