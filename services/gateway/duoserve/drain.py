"""Graceful drain on SIGTERM.

uvicorn on its own, at SIGTERM, closes the listener at once, closes idle keep-alive connections,
lets requests in progress finish (``timeout_graceful_shutdown``) and exits; readiness never turns
503 first, so a load balancer keeps sending new connections until they are refused. DuoServe adds
a drain delay in front of that:

1. SIGTERM: readiness (the routes declared with a ``draining`` body: ``/v2/health/ready``,
   ``/ping``, below the root path) answers 503 at once, every response says
   ``Connection: close`` (keep-alive clients reconnect, to another replica once the balancer has
   seen the 503); requests are still accepted and served.
2. After ``drain_delay_s``: uvicorn's own shutdown starts: listener closed, in-flight requests
   finish within ``drain_grace_s``, then the process exits.

A second SIGTERM, or SIGINT (Ctrl-C), skips the delay. The hook chains uvicorn's own signal
handler (installed with ``signal.signal``), so it works with one worker or several, and does
nothing when the app is not run by uvicorn (tests).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, MutableMapping
from types import FrameType
from typing import Any

from duoserve.auth import ASGIApp, Receive, Scope, Send
from duoserve.routes import RouteTable

log = logging.getLogger(__name__)


class Drain:
    """Whether this process is draining, and for how long it keeps serving before it stops."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.draining = False

    def begin(self) -> None:
        if not self.draining:
            log.warning("draining: readiness is 503 now; stopping in %.1f s", self.delay_s)
        self.draining = True


class DrainMiddleware:
    """While draining: readiness answers 503, and every response closes its connection.
    Readiness is what the request's route declares (``routes``)."""

    def __init__(self, app: ASGIApp, drain: Drain, routes: RouteTable) -> None:
        self.app = app
        self.drain = drain
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        body = self.routes.resolve(scope).info.draining if drain.draining else None
        if body is not None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        # Decided when the response starts, not when the request came in: a request already in
        # flight at SIGTERM must not leave a keep-alive connection that the client reuses just
        # as the listener closes (its next request would be dropped unread).
        async def closing_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and drain.draining:
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)


def _is_uvicorn_handler(handler: Any) -> bool:
    try:
        from uvicorn.server import Server
    except ImportError:  # pragma: no cover - uvicorn is a dependency of the gateway
        return False
    return isinstance(getattr(handler, "__self__", None), Server)


def chain_uvicorn_signals(drain: Drain, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Put the drain delay in front of uvicorn's SIGTERM/SIGINT handling; returns an undo."""
    previous: dict[int, Any] = {}
    for sig in (int(signal.SIGTERM), int(signal.SIGINT)):
        handler = signal.getsignal(sig)
        if _is_uvicorn_handler(handler):
            previous[sig] = handler
    if not previous:
        return lambda: None
    timer: list[asyncio.TimerHandle] = []

    def stop_now(sig: int) -> None:
        for handle in timer:
            handle.cancel()
        previous[sig](sig, None)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: only flip a flag and hand over to the loop.
        if drain.draining or sig != signal.SIGTERM or drain.delay_s <= 0:
            drain.begin()
            loop.call_soon_threadsafe(stop_now, sig)
            return
        drain.begin()

        def schedule() -> None:
            timer.append(loop.call_later(drain.delay_s, stop_now, sig))

        loop.call_soon_threadsafe(schedule)

    for sig in previous:
        signal.signal(sig, on_signal)

    def undo() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    return undo
