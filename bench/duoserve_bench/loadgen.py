"""The load generator: closed-loop users or an open-loop constant arrival rate, in worker
processes of their own (never in the process being measured), on uvloop + aiohttp or grpc.aio.

Open loop is free of coordinated omission: request ``i`` is due at ``start + i / rate`` whether
or not earlier ones have answered, and its latency runs from that intended time, so a server
that falls behind shows its queueing in the percentiles instead of slowing the generator down.

Every process shares one clock (CLOCK_MONOTONIC): the controller picks a start time a moment
ahead, each worker warms up until ``start + warmup`` and measures after it, and the controller
reads the server's CPU counters at those same instants.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp  # the `bench` extra; `duoserve bench` says how to install it when missing
import numpy as np

from duoserve_bench.targets import RequestSpec

# Status codes recorded besides HTTP ones (gRPC OK is recorded as 200).
TRANSPORT_ERROR = -1
CLIENT_TIMEOUT = -2
GRPC_BASE = 1000  # 1000 + grpc.StatusCode value


@dataclass(slots=True)
class Phase:
    """One run's share for one worker process."""

    spec: RequestSpec
    mode: str  # "closed" | "open"
    concurrency: int = 1
    rate: float = 0.0
    offset_s: float = 0.0
    warmup_s: float = 1.0
    duration_s: float | None = 10.0
    requests: int | None = None
    timeout_s: float = 30.0
    max_in_flight: int = 4096


@dataclass(slots=True)
class Samples:
    """Measured requests of one worker: send time (from the measurement start; the intended
    time in open loop), latency in seconds, and status (HTTP, or the codes above)."""

    sent_at: np.ndarray
    latency: np.ndarray
    status: np.ndarray
    client_cpu_s: float
    warmup_requests: int

    @classmethod
    def merge(cls, parts: list[Samples]) -> Samples:
        order = np.argsort(np.concatenate([p.sent_at for p in parts]), kind="stable")
        return cls(
            np.concatenate([p.sent_at for p in parts])[order],
            np.concatenate([p.latency for p in parts])[order],
            np.concatenate([p.status for p in parts])[order],
            sum(p.client_cpu_s for p in parts),
            sum(p.warmup_requests for p in parts),
        )


Send = Callable[[], Awaitable[int]]


class _Http:
    def __init__(self, spec: RequestSpec, limit: int, timeout_s: float) -> None:
        self.spec = spec
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            skip_auto_headers=("User-Agent",),
            auto_decompress=False,
        )

    async def send(self) -> int:
        spec = self.spec
        try:
            async with self.session.post(spec.url, data=spec.body, headers=spec.headers) as r:
                await r.read()
                return r.status
        except TimeoutError:
            return CLIENT_TIMEOUT
        except (aiohttp.ClientError, OSError):
            return TRANSPORT_ERROR

    async def close(self) -> None:
        await self.session.close()


class _Grpc:
    def __init__(self, spec: RequestSpec, timeout_s: float) -> None:
        import grpc

        self._grpc = grpc
        self.channel = grpc.aio.insecure_channel(
            spec.url,
            options=[
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
            ],
        )
        # No serializers: the pre-serialized request goes out as it is, the answer stays bytes.
        self.call = self.channel.unary_unary(spec.method)
        self.body = spec.body
        self.timeout_s = timeout_s

    async def send(self) -> int:
        try:
            await self.call(self.body, timeout=self.timeout_s)
            return 200
        except self._grpc.aio.AioRpcError as error:
            code = error.code()
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                return CLIENT_TIMEOUT
            return GRPC_BASE + int(code.value[0])

    async def close(self) -> None:
        await self.channel.close()


class _Recorder:
    def __init__(self, t0: float, progress: Any, slot: int) -> None:
        self.t0 = t0
        self.sent: list[float] = []
        self.latency: list[float] = []
        self.status: list[int] = []
        self.warmup = 0
        self._progress = progress
        self._slot = slot

    def add(self, sent: float, done: float, status: int) -> None:
        if self._progress is not None:
            self._progress[self._slot] += 1
        if sent < self.t0:
            self.warmup += 1
            return
        self.sent.append(sent - self.t0)
        self.latency.append(done - sent)
        self.status.append(status)


async def run_phase(phase: Phase, t_go: float, progress: Any = None, slot: int = 0) -> Samples:
    """Run one phase in this process's event loop, starting at ``t_go`` (monotonic clock)."""
    spec = phase.spec
    t0 = t_go + phase.warmup_s
    t_end = t0 + phase.duration_s if phase.duration_s is not None else float("inf")
    budget = phase.requests if phase.requests is not None else -1
    limit = phase.concurrency if phase.mode == "closed" else phase.max_in_flight
    client: _Http | _Grpc = (
        _Grpc(spec, phase.timeout_s) if spec.kind == "grpc" else _Http(spec, limit, phase.timeout_s)
    )
    record = _Recorder(t0, progress, slot)
    cpu_before = time.process_time()
    measured = 0
    clock = time.monotonic
    try:
        await asyncio.sleep(max(0.0, t_go - clock()))
        if phase.mode == "closed":

            async def user() -> None:
                nonlocal measured
                while True:
                    sent = clock()
                    if sent >= t_end:
                        return
                    if sent >= t0:
                        if budget >= 0 and measured >= budget:
                            return
                        measured += 1
                    status = await client.send()
                    record.add(sent, clock(), status)

            await asyncio.gather(*(user() for _ in range(phase.concurrency)))
        else:
            gate = asyncio.Semaphore(phase.max_in_flight)
            pending: set[asyncio.Task[None]] = set()

            async def fire(intended: float) -> None:
                async with gate:  # waiting here still counts: latency runs from `intended`
                    status = await client.send()
                record.add(intended, clock(), status)

            interval = 1.0 / phase.rate
            i = 0
            while True:
                intended = t_go + phase.offset_s + i * interval
                if intended >= t_end or (budget >= 0 and measured >= budget):
                    break
                if intended >= t0:
                    measured += 1
                delay = intended - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.get_running_loop().create_task(fire(intended))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            if pending:
                await asyncio.gather(*list(pending))
    finally:
        await client.close()
    return Samples(
        np.asarray(record.sent, dtype=np.float64),
        np.asarray(record.latency, dtype=np.float64),
        np.asarray(record.status, dtype=np.int32),
        time.process_time() - cpu_before,
        record.warmup,
    )


def _run_loop(coro: Awaitable[Samples]) -> Samples:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def _worker(conn: multiprocessing.connection.Connection, slot: int, progress: Any) -> None:
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        phase, t_go = message
        try:
            conn.send(_run_loop(run_phase(phase, t_go, progress, slot)))
        except Exception as error:  # noqa: BLE001 - reported to the controller, not lost
            conn.send(RuntimeError(f"load generator failed: {error!r}"))


class LoadGenerator:
    """Persistent worker processes (spawned, so nothing of the caller's state leaks in)."""

    def __init__(self, processes: int = 1) -> None:
        context = multiprocessing.get_context("spawn")
        self.progress = context.Array("q", processes, lock=False)
        self._workers: list[tuple[Any, multiprocessing.connection.Connection]] = []
        for slot in range(processes):
            mine, theirs = context.Pipe()
            proc = context.Process(target=_worker, args=(theirs, slot, self.progress), daemon=True)
            proc.start()
            self._workers.append((proc, mine))
        for _, conn in self._workers:
            if conn.recv() != "ready":
                raise RuntimeError("a load generator process did not start")

    @property
    def processes(self) -> int:
        return len(self._workers)

    def completed(self) -> int:
        return int(sum(self.progress))

    def run(
        self,
        phase: Phase,
        *,
        at_start: Callable[[], None] | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> tuple[Samples, float]:
        """Run ``phase`` split over the workers; returns (samples, t0) where t0 is the
        measurement start. ``at_start`` runs at t0 (e.g. read the server's CPU time);
        ``while_waiting`` every 0.2 s until the workers answer (a progress bar)."""
        n = len(self._workers)
        for i in range(n):
            self.progress[i] = 0
        shares = _split(phase, n)
        t_go = time.monotonic() + 0.2
        active = self._workers[: len(shares)]
        for (_, conn), share in zip(active, shares, strict=True):
            conn.send((share, t_go))
        t0 = t_go + phase.warmup_s
        if at_start is not None:
            while (left := t0 - time.monotonic()) > 0:
                time.sleep(min(left, 0.2))
                if while_waiting is not None:
                    while_waiting()
            at_start()
        parts: list[Samples] = []
        for _, conn in active:
            while not conn.poll(0.2):
                if while_waiting is not None:
                    while_waiting()
            answer = conn.recv()
            if isinstance(answer, Exception):
                raise answer
            parts.append(answer)
        return Samples.merge(parts), t0

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
        self._workers = []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split(phase: Phase, n: int) -> list[Phase]:
    """Each worker's share of the users, the rate (phase-shifted) and the request budget."""
    shares = []
    for i in range(n):
        share = dataclasses.replace(phase)
        if phase.mode == "closed":
            share.concurrency = phase.concurrency // n + (1 if i < phase.concurrency % n else 0)
        else:
            share.rate = phase.rate / n
            share.offset_s = i / phase.rate
        if phase.requests is not None:
            share.requests = phase.requests // n + (1 if i < phase.requests % n else 0)
        shares.append(share)
    return [s for s in shares if s.mode == "open" or s.concurrency > 0]
