"""Deadlines, concurrency limits, retry budget, circuit breaker, cancel-on-disconnect."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from duoserve.errors import Overloaded, UpstreamTimeout


class Deadline:
    """An absolute point in monotonic time by which a request must be answered."""

    __slots__ = ("expires_at", "budget_s")

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.expires_at = time.monotonic() + budget_s

    def remaining(self) -> float:
        """Seconds left; never negative."""
        return max(0.0, self.expires_at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def check(self, what: str = "the request") -> float:
        """Seconds left, or UpstreamTimeout when none are."""
        left = self.expires_at - time.monotonic()
        if left <= 0:
            raise UpstreamTimeout(f"{what} ran past its deadline of {self.budget_s * 1000:.0f} ms")
        return left


class ConcurrencyLimiter:
    """At most ``limit`` holders at once, ``max_queue`` more waiting; beyond that, shed at once.

    A waiter gives up after ``max_wait_s`` (or its deadline) with 503 rather than wait until it
    times out: an overloaded backend is answered for in milliseconds, not seconds.
    """

    def __init__(self, what: str, limit: int, max_queue: int, max_wait_s: float = 1.0) -> None:
        self.what = what
        self.limit = limit
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, deadline: Deadline) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(f"{self.what} is at its concurrency limit; retry shortly")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await asyncio.wait_for(future, min(self.max_wait_s, deadline.remaining()))
        except TimeoutError:
            # The slot may have been handed over just as the wait timed out (wait_for can
            # still raise then): keep it rather than leak it.
            if future.done() and not future.cancelled():
                return
            raise Overloaded(
                f"{self.what} stayed at its concurrency limit; retry shortly"
            ) from None
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over as we gave up: pass it on
            raise
        finally:
            if future in self._waiters:
                self._waiters.remove(future)

    def release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # hand the slot straight to the next waiter
                return
        self.active -= 1


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``reset_s`` lets one probe through
    (half-open); closes on its success, opens again on its failure."""

    def __init__(
        self,
        threshold: int = 5,
        reset_s: float = 2.0,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self.state = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._on_change = on_change

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """Whether a call may go ahead now (and, half-open, claims the probe)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if time.monotonic() - self._opened_at < self.reset_s:
                return False
            self._set("half_open")
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_after_s(self) -> float:
        return max(0.0, self.reset_s - (time.monotonic() - self._opened_at))

    def record_success(self) -> None:
        self.failures = 0
        self._probing = False
        self._set("closed")

    def record_failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state == "open":
            return  # a straggler started before the circuit opened: do not extend the wait
        if self.state == "half_open" or self.failures >= self.threshold:
            self._opened_at = time.monotonic()
            self._set("open")

    def record_neutral(self) -> None:
        """The call ended in a way that says nothing about health (shed by the gateway's own
        limiter, cancelled, or a client error). Half-open, the probe slot is freed so the next
        call probes: closing here would trust a backend no call has reached."""
        self._probing = False


@dataclass
class BackendGuard:
    """A backend's resilience state, which every call to it goes through (and which a reload
    that keeps the backend keeps too)."""

    limiter: ConcurrencyLimiter
    breaker: CircuitBreaker
    retries: int
    timeout_s: float


class RetryBudget:
    """Retries allowed while they stay under ``ratio`` of active requests (at least ``minimum``),
    so a failing backend is not hammered with a multiple of its load."""

    def __init__(self, ratio: float = 0.2, minimum: int = 10) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.active = 0
        self.retrying = 0

    def can_retry(self) -> bool:
        return self.retrying < max(self.minimum, self.ratio * self.active)


def backoff_s(attempt: int, base_s: float = 0.01, cap_s: float = 0.2) -> float:
    """Full-jitter exponential backoff."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))


class CancelOnDisconnect:
    """ASGI middleware: when the client goes away while a POST is being handled, cancel the
    handler, so the backend call (and its concurrency slot) is released instead of running on.

    uvicorn does not cancel a request's task when its client disconnects; it only answers the
    next ``receive()`` with ``http.disconnect``. Once the app has read the whole body, a watcher
    waits on that ``receive()`` beside the handler and cancels the handler when it fires before
    the response is complete. The watcher starts only once a request has run ``watch_after_s``
    past its body: most answers come sooner, and a task per request costs more CPU than the rest
    of this middleware (a timer is a tenth of it). A client that left earlier is still seen: its
    disconnect is waiting in ``receive()`` when the watcher starts. GET requests are short and
    never watched.
    """

    def __init__(self, app: Any, watch_after_s: float = 0.02) -> None:
        self.app = app
        self.watch_after_s = watch_after_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        # The handler runs in this very task (no extra task, no extra context switch per
        # request); the watcher, when it starts, cancels this task if the client goes away
        # before the response is complete.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        responded = False
        gone = False
        timer: asyncio.TimerHandle | None = None
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and not responded:
                gone = True
                task.cancel()

        def start_watching() -> None:
            nonlocal watcher
            if not responded:
                watcher = loop.create_task(watch())

        async def tracking_receive() -> Any:
            nonlocal timer
            message = await receive()
            done = message["type"] != "http.request" or not message.get("more_body", False)
            if done and timer is None:
                timer = loop.call_later(self.watch_after_s, start_watching)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        try:
            await self.app(scope, tracking_receive, tracking_send)
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                return  # our own cancel: the client left, nobody to answer
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()
