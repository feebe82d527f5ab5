"""Concurrency limits, circuit breaker, retry budget, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from duoserve.errors import Overloaded, UpstreamTimeout
from duoserve.resilience import (
    CircuitBreaker,
    ConcurrencyLimiter,
    Deadline,
    RetryBudget,
    backoff_s,
)
from tests.timing import FakeClock

# -- ConcurrencyLimiter ----------------------------------------------------------------------


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_limiter_admits_up_to_the_limit_at_once() -> None:
    limiter = ConcurrencyLimiter("backend 'x'", limit=3, max_queue=0)
    for _ in range(3):
        await limiter.acquire(Deadline(1))
    assert limiter.active == 3
    limiter.release()
    assert limiter.active == 2


async def test_limiter_queues_then_sheds_immediately_when_the_queue_is_full() -> None:
    limiter = ConcurrencyLimiter("backend 'x'", limit=2, max_queue=2, max_wait_s=5)
    await limiter.acquire(Deadline(5))
    await limiter.acquire(Deadline(5))
    waiters = [asyncio.create_task(limiter.acquire(Deadline(5))) for _ in range(2)]
    await _settle()
    assert limiter.queued == 2
    assert not any(w.done() for w in waiters)

    # Shed at once: the first step of acquire() raises, without waiting on anything.
    shed = limiter.acquire(Deadline(5))
    with pytest.raises(Overloaded) as caught:
        shed.send(None)
    assert caught.value.status == 503
    assert "backend 'x' is at its concurrency limit" in caught.value.message
    assert caught.value.headers["retry-after"] == "1"

    # A release hands the slot straight to the first waiter: active stays at the limit.
    limiter.release()
    await _settle()
    assert waiters[0].done() and not waiters[1].done()
    assert limiter.active == 2
    assert limiter.queued == 1
    limiter.release()
    await _settle()
    assert waiters[1].done()
    assert limiter.queued == 0
    limiter.release()
    limiter.release()
    assert limiter.active == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    limiter = ConcurrencyLimiter("m", limit=1, max_queue=5)
    await limiter.acquire(Deadline(5))
    order: list[int] = []

    async def wait(i: int) -> None:
        await limiter.acquire(Deadline(5))
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(4)]
    await _settle()
    for _ in range(4):
        limiter.release()
        await _settle()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_new_caller_does_not_jump_the_queue() -> None:
    limiter = ConcurrencyLimiter("m", limit=1, max_queue=5)
    await limiter.acquire(Deadline(5))
    waiter = asyncio.create_task(limiter.acquire(Deadline(5)))
    await _settle()
    limiter.release()
    # The slot belongs to the waiter now, so a newcomer must queue.
    late = asyncio.create_task(limiter.acquire(Deadline(5)))
    await _settle()
    assert waiter.done()
    assert not late.done()
    limiter.release()
    await late


async def test_waiter_gives_up_after_max_wait() -> None:
    limiter = ConcurrencyLimiter("model 'digits'", limit=1, max_queue=1, max_wait_s=0.05)
    await limiter.acquire(Deadline(5))
    deadline = Deadline(5)
    started = time.monotonic()
    with pytest.raises(Overloaded, match="stayed at its concurrency limit"):
        await limiter.acquire(deadline)
    # It waited its max_wait_s (50 ms; 1 ms for timer granularity), and gave up then, long
    # before its 5 s deadline.
    assert time.monotonic() - started >= limiter.max_wait_s - 0.001
    assert not deadline.expired()
    assert limiter.queued == 0
    # The holder's release does not leak a slot to the departed waiter.
    limiter.release()
    assert limiter.active == 0


async def test_waiter_gives_up_at_its_deadline() -> None:
    limiter = ConcurrencyLimiter("m", limit=1, max_queue=1, max_wait_s=10)
    await limiter.acquire(Deadline(5))
    deadline = Deadline(0.05)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await limiter.acquire(deadline)
    # Its deadline (50 ms) ended the wait, not max_wait_s (10 s).
    assert deadline.expired()
    assert time.monotonic() - started < limiter.max_wait_s


async def test_cancelled_waiter_leaves_the_queue() -> None:
    limiter = ConcurrencyLimiter("m", limit=1, max_queue=1)
    await limiter.acquire(Deadline(5))
    waiter = asyncio.create_task(limiter.acquire(Deadline(5)))
    await _settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.queued == 0
    limiter.release()
    assert limiter.active == 0
    await limiter.acquire(Deadline(1))  # the slot is free again
    assert limiter.active == 1


async def test_slot_handed_to_a_waiter_cancelled_at_that_moment_is_not_lost() -> None:
    limiter = ConcurrencyLimiter("m", limit=1, max_queue=2)
    await limiter.acquire(Deadline(5))
    first = asyncio.create_task(limiter.acquire(Deadline(5)))
    second = asyncio.create_task(limiter.acquire(Deadline(5)))
    await _settle()
    limiter.release()  # hands the slot to `first` ...
    first.cancel()  # ... which is cancelled before it could run
    await _settle()
    holders = [t for t in (first, second) if t.done() and not t.cancelled()]
    # Whoever ended up with it, exactly one caller holds the one slot; none leaked.
    assert len(holders) == 1
    assert limiter.active == 1
    limiter.release()
    await _settle()
    pending = [t for t in (first, second) if not t.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert limiter.active in (0, 1)
    if limiter.active:
        limiter.release()
    assert limiter.active == 0
    assert limiter.queued == 0


# -- CircuitBreaker --------------------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    changes: list[str] = []
    breaker = CircuitBreaker(threshold=3, reset_s=10, on_change=changes.append)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the count: failures must be consecutive
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert 9 < breaker.retry_after_s() <= 10
    assert changes == ["open"]


def test_half_open_lets_one_probe_through_and_closes_on_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock.install(monkeypatch)
    changes: list[str] = []
    breaker = CircuitBreaker(threshold=1, reset_s=0.05, on_change=changes.append)
    breaker.record_failure()
    assert not breaker.allow()
    clock.advance(0.05 - 1e-6)
    assert not breaker.allow()
    clock.advance(2e-6)
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # only one at a time
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(5))
    assert changes == ["open", "half_open", "closed"]


def test_failed_probe_reopens(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock.install(monkeypatch)
    breaker = CircuitBreaker(threshold=2, reset_s=0.05)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(0.06)
    assert breaker.allow()
    breaker.record_failure()  # one failure is enough when half-open
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.advance(0.05 - 1e-6)
    assert not breaker.allow()  # a new full reset period from the failed probe
    clock.advance(2e-6)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"


def test_neutral_probe_outcome_frees_the_probe_without_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock.install(monkeypatch)
    breaker = CircuitBreaker(threshold=1, reset_s=0.05)
    breaker.record_failure()
    clock.advance(0.06)
    assert breaker.allow()
    breaker.record_neutral()  # e.g. the probe was shed by the gateway's own limiter
    assert breaker.state == "half_open"  # nothing reached the backend: still unproven
    assert breaker.allow()  # the next call is the probe
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"


def test_straggler_failure_does_not_extend_the_open_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock.install(monkeypatch)
    breaker = CircuitBreaker(threshold=1, reset_s=0.1)
    breaker.record_failure()
    clock.advance(0.06)
    breaker.record_failure()  # a call started before the circuit opened, failing late
    clock.advance(0.05)
    assert breaker.allow()  # 0.11 s after opening, not 0.05 s after the straggler


# -- RetryBudget, backoff --------------------------------------------------------------------


def test_retry_budget_minimum_and_ratio() -> None:
    budget = RetryBudget(ratio=0.2, minimum=3)
    assert budget.can_retry()
    budget.retrying = 3
    assert not budget.can_retry()  # at the minimum with little traffic
    budget.active = 100
    assert budget.can_retry()  # 20% of 100 in flight
    budget.retrying = 20
    assert not budget.can_retry()


def test_backoff_is_bounded_full_jitter() -> None:
    values = [backoff_s(attempt) for attempt in range(1, 12) for _ in range(50)]
    assert all(0 <= v <= 0.2 for v in values)
    assert max(backoff_s(1) for _ in range(200)) <= 0.02
    assert len(set(values)) > 100  # jittered, not a fixed sleep


# -- Deadline --------------------------------------------------------------------------------


def test_deadline_counts_down_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock.install(monkeypatch)
    deadline = Deadline(0.05)
    assert deadline.remaining() == pytest.approx(0.05)
    clock.advance(0.03)
    assert deadline.remaining() == pytest.approx(0.02)
    assert not deadline.expired()
    assert deadline.check() == pytest.approx(0.02)
    clock.advance(0.02 + 1e-6)
    assert deadline.expired()
    assert deadline.remaining() == 0.0
    with pytest.raises(UpstreamTimeout) as caught:
        deadline.check("the tensorflow backend")
    assert caught.value.status == 504
    assert caught.value.message == "the tensorflow backend ran past its deadline of 50 ms"
