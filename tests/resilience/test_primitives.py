"""Deadline, ConcurrencyLimiter, CircuitBreaker, RetryBudget and CancelOnDisconnect on their own."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from duoserve.errors import Overloaded, UpstreamTimeout
from duoserve.resilience import (
    CancelOnDisconnect,
    CircuitBreaker,
    ConcurrencyLimiter,
    Deadline,
    RetryBudget,
    backoff_s,
)
from tests.timing import FakeClock


def test_deadline_check_raises_504_with_the_budget() -> None:
    deadline = Deadline(0.0)
    with pytest.raises(UpstreamTimeout, match="deadline of 0 ms") as caught:
        deadline.check("the call")
    assert caught.value.status == 504
    assert Deadline(10).remaining() > 9


async def test_limiter_sheds_at_once_when_slots_and_queue_are_full() -> None:
    limiter = ConcurrencyLimiter("backend 'x'", limit=1, max_queue=1, max_wait_s=5)
    deadline = Deadline(10)
    await limiter.acquire(deadline)  # the one slot
    queued = asyncio.ensure_future(limiter.acquire(deadline))
    await asyncio.sleep(0)
    assert limiter.queued == 1
    # At once: the first step of acquire() raises, without waiting on anything.
    shed = limiter.acquire(deadline)
    with pytest.raises(Overloaded) as caught:
        shed.send(None)
    assert caught.value.status == 503 and caught.value.headers["retry-after"] == "1"
    limiter.release()  # hands the slot to the queued waiter
    await queued
    assert (limiter.active, limiter.queued) == (1, 0)
    limiter.release()
    assert limiter.active == 0


async def test_limiter_waiter_gives_up_within_its_deadline_and_leaks_no_slot() -> None:
    limiter = ConcurrencyLimiter("model 'm'", limit=1, max_queue=4, max_wait_s=5)
    await limiter.acquire(Deadline(10))
    deadline = Deadline(0.05)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await limiter.acquire(deadline)
    # Its deadline (50 ms) ended the wait, not max_wait_s (5 s).
    assert deadline.expired()
    assert time.monotonic() - started < limiter.max_wait_s
    cancelled = asyncio.ensure_future(limiter.acquire(Deadline(10)))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    limiter.release()
    assert (limiter.active, limiter.queued) == (0, 0)
    await limiter.acquire(Deadline(1))  # the slot is free again
    assert limiter.active == 1


def test_breaker_opens_after_threshold_then_probes_once_and_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock.install(monkeypatch)
    states: list[str] = []
    breaker = CircuitBreaker(threshold=3, reset_s=0.05, on_change=states.append)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.allow() and breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.retry_after_s() == pytest.approx(0.05)
    clock.advance(0.05 - 1e-6)
    assert not breaker.allow()
    clock.advance(2e-6)
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open" and not breaker.allow()  # only one probe at a time
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()
    assert states == ["open", "half_open", "closed"]


def test_breaker_half_open_failure_reopens_and_neutral_outcome_does_not_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock.install(monkeypatch)
    breaker = CircuitBreaker(threshold=1, reset_s=0.01)
    breaker.record_failure()
    clock.advance(0.01 + 1e-6)
    assert breaker.allow()
    breaker.record_neutral()  # e.g. shed by the gateway's own limiter: nothing was learned
    assert breaker.state == "half_open"
    assert breaker.allow()  # the probe slot was freed for the next call
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()


def test_breaker_stragglers_do_not_extend_the_open_period(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock.install(monkeypatch)
    breaker = CircuitBreaker(threshold=1, reset_s=0.05)
    breaker.record_failure()
    clock.advance(0.03)
    breaker.record_failure()  # a call that started before the circuit opened
    clock.advance(0.02 + 1e-6)
    assert breaker.allow()  # 50 ms after opening, not 20 ms after the straggler


def test_retry_budget_is_a_share_of_active_calls_with_a_floor() -> None:
    budget = RetryBudget(ratio=0.2, minimum=3)
    budget.retrying = 2
    assert budget.can_retry()
    budget.retrying = 3
    assert not budget.can_retry()  # 3 of 0 active: the floor
    budget.active = 100
    assert budget.can_retry()
    budget.retrying = 20
    assert not budget.can_retry()  # 20% of 100


def test_backoff_is_jittered_and_capped() -> None:
    values = {backoff_s(3) for _ in range(50)}
    assert len(values) > 40
    assert all(0 <= v <= 0.08 for v in values)
    assert all(v <= 0.2 for v in (backoff_s(30) for _ in range(50)))


# The watcher starts 20 ms after the body: a client may leave before or after that.
@pytest.mark.parametrize("leaves", ["before_the_watcher_starts", "while_the_watcher_listens"])
async def test_cancel_on_disconnect_cancels_the_handler_when_the_client_leaves(
    leaves: str,
) -> None:
    cancelled = asyncio.Event()
    watcher_listens = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        try:
            await asyncio.sleep(10)  # the backend call
        except asyncio.CancelledError:
            cancelled.set()
            raise

    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
    client_left = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        watcher_listens.set()  # only the watcher asks for more than the body
        await client_left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing may be sent to a client that left")

    app = CancelOnDisconnect(slow_app)
    if leaves == "before_the_watcher_starts":
        client_left.set()  # the disconnect waits in receive() for the watcher to come
    task = asyncio.ensure_future(app({"type": "http", "method": "POST"}, receive, send))
    if leaves == "while_the_watcher_listens":
        await watcher_listens.wait()
        client_left.set()
    # Returns quietly (no error logged for a departed client), cancelled in its backend call:
    # uncancelled, the handler would sleep its 10 s out and return without `cancelled` set.
    await task
    assert cancelled.is_set()


async def test_cancel_on_disconnect_leaves_a_completed_response_alone() -> None:
    sent: list[Any] = []
    finished: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        await asyncio.sleep(0.02)  # work after the response (e.g. metrics) must not be cut
        finished.append(True)

    queue = [
        {"type": "http.request", "body": b"", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await CancelOnDisconnect(app)({"type": "http", "method": "POST"}, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert finished == [True]


async def test_cancel_on_disconnect_watches_every_request_when_it_is_due() -> None:
    """Several requests in flight at once: each gets its watcher once it has run watch_after_s
    past its own body (not before); one answered sooner never gets one. Each client that then
    leaves has its own handler cancelled."""
    loop = asyncio.get_running_loop()
    after_s = 0.05
    cancelled: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        if scope["path"] == "/fast":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        try:
            await asyncio.sleep(10)  # the backend call
        except asyncio.CancelledError:
            cancelled.append(scope["n"])
            raise

    guard = CancelOnDisconnect(app, watch_after_s=after_s)
    body_read: dict[int, float] = {}
    watched: dict[int, float] = {}
    left = asyncio.Event()

    def client(n: int) -> tuple[Any, Any]:
        async def receive() -> dict[str, Any]:
            if n not in body_read:
                body_read[n] = loop.time()
                return {"type": "http.request", "body": b"{}", "more_body": False}
            watched[n] = loop.time()  # only a watcher asks for more than the body
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            assert n == 3, "only the fast request answers"

        return receive, send

    tasks = []
    for n, path in enumerate(["/slow", "/slow", "/slow", "/fast"]):
        receive, send = client(n)
        scope = {"type": "http", "method": "POST", "path": path, "n": n}
        tasks.append(asyncio.ensure_future(guard(scope, receive, send)))
        # Bodies read 10 ms apart, all before the first is due: they fall due one by one.
        await asyncio.sleep(0.01)
    await tasks[3]  # the fast one, answered at once
    for _ in range(200):
        if len(watched) == 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(2 * after_s)  # past the time the fast one would have been watched
    assert sorted(watched) == [0, 1, 2]  # every slow request is watched, the fast one is not
    for n in (0, 1, 2):
        assert watched[n] - body_read[n] >= after_s - 0.001, (n, watched, body_read)
    left.set()  # every slow client leaves: their handlers are cancelled and end quietly
    await asyncio.gather(*tasks[:3])
    assert sorted(cancelled) == [0, 1, 2]
