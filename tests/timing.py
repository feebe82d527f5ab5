"""Time in tests without fixed sleeps or speed limits: wait for a condition (with a generous
guard so a broken feature fails instead of hanging), or move a clock by hand.

Speed is measured in the benchmarks, never asserted here: a guard's timeout only bounds how long
a test waits for something that should happen, and its failure says what never happened.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from duoserve import resilience


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 30.0
) -> None:
    """Return as soon as ``check()`` holds (it may be async); AssertionError naming ``what``
    when it still does not after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > give_up_at:
            raise AssertionError(f"{what}: still not the case after {timeout_s} s")
        await asyncio.sleep(0.005)


class FakeClock:
    """The monotonic clock of duoserve.resilience (deadlines, circuit breakers), standing still
    until the test moves it: time-based behaviour checked exactly, with no sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str) -> Any:  # the rest of the time module, unchanged
        return getattr(time, name)

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
        clock = cls()
        monkeypatch.setattr(resilience, "time", clock)
        return clock
