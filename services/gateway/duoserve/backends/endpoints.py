"""A remote backend's replicas (endpoints): found by DNS, balanced per request, ejected when
they fail, drained when they leave.

Why the gateway balances by itself: gRPC keeps one HTTP/2 connection per channel and a
keep-alive HTTP pool reuses its connections, so behind one virtual address (a Kubernetes
ClusterIP) every call of a gateway replica lands on the few backend pods its connections
happened to reach, whatever the autoscaler adds. Here a backend's address is a name resolved to
all of its addresses (a headless Service lists every Ready pod) and resolved again every
``resolve_interval_s``; each address is an :class:`Endpoint` with its own connection pool or
channel, and every call picks one:

- **Power of two choices over least outstanding requests** (Envoy's LEAST_REQUEST, Finagle's
  P2C): two endpoints at random, the one with fewer calls in flight; and when one of the two
  is clearly slower (its recent latency over twice the other's), (calls in flight + 1) x
  latency decides, as Finagle's and Linkerd's EWMA balancers do. Calls in flight alone see a
  slow replica only once calls pile up on it: measured here, a replica made 5x slower still
  got 19 % of the calls of three at concurrency 8, and a full third at concurrency 1. Latency
  alone would tilt the shares of identical replicas by the noise in their averages. The
  latency is a moving average of successful calls (a stray slow call moves it little) that
  fades while a replica gets no calls, so a replica that was slow is tried again.
- **Slow start**: an endpoint that joins (or returns from ejection) is taken, when the choice
  falls on it, with a probability that grows linearly from a tenth to 1 over ``slow_start_s``,
  so a pod that is still warming up gets a growing share, at low load and high alike.
- **Outlier ejection**: ``consecutive_failures`` failed calls in a row (refused or dropped
  connections, 5xx, timeouts) eject an endpoint for ``base_ejection_s`` times the number of
  times it was ejected (capped at ``max_ejection_s``); it returns when a health probe passes.
  Never more than ``max_ejected_percent`` of the endpoints are out at once.
- **Draining**: an endpoint that leaves DNS takes no new calls; its calls in flight finish,
  then its connections close. A resolver that fails or returns nothing keeps the last good set.

With a single endpoint (the laptop, one container) a call costs one length check more.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import random
import socket
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry

from duoserve.backends.base import Backend
from duoserve.backends.coalesce import Coalescer
from duoserve.config import CoalesceConfig, OutlierConfig
from duoserve.errors import DuoServeError, Overloaded, Unavailable, UpstreamError, UpstreamTimeout
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Failures that count towards ejecting an endpoint: it could not be reached, failed, or was
# too slow. A backend saying it is at capacity (Overloaded) is not failing: the balancer already
# steers away from busy endpoints, and ejecting busy ones would shrink capacity under load.
ENDPOINT_FAULTS = (Unavailable, UpstreamError, UpstreamTimeout)

# Share of a full weight that an endpoint starts with in slow start.
SLOW_START_MIN_WEIGHT = 0.1
# Latency average: weight of each new successful call; a call counts as at most twice the
# average so far (one stray slow call, a first call that warms a model up, moves it little; a
# replica that stays slow still gets there in a few calls); and how fast the average fades while
# a replica gets no calls (e-folding time), so a replica once slow is called again soon.
LATENCY_ALPHA = 0.2
LATENCY_OUTLIER_FACTOR = 2.0
LATENCY_FADE_S = 2.0
# Two replicas' latencies count only when one is this much slower than the other: among
# replicas alike, calls in flight alone decide (noise in the averages would otherwise tilt the
# shares of identical replicas).
SLOWER_BY = 2.0

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address of ``host``: its IPv4 addresses, or its IPv6 ones when it has none.

    One family only: a dual-stack name would otherwise count every pod twice (and a server
    listening on one family would look half dead)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    v4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET6})
    return v4 or v6


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host_port(entry: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port)."""
    host, _, port = entry.rpartition(":")
    return host.strip("[]"), int(port)


def endpoint_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Endpoint(Generic[T]):
    """One replica: its transport (connection pool or channel) and its health."""

    __slots__ = (
        "address",
        "host",
        "port",
        "transport",
        "outstanding",
        "state",
        "failures",
        "ejections",
        "ejected_until",
        "warm_from",
        "warm_until",
        "latency",
        "sampled_at",
        "returned_at",
        "probe_task",
        "_requests",
        "_in_flight",
    )

    def __init__(self, host: str, port: int, transport: T, metrics: Metrics, backend: str):
        self.host = host
        self.port = port
        self.address = endpoint_label(host, port)
        self.transport = transport
        self.outstanding = 0
        self.state = "active"  # active | ejected | draining
        self.failures = 0  # consecutive
        self.ejections = 0
        self.ejected_until = 0.0
        self.warm_from = 0.0
        self.warm_until = 0.0  # slow start ends here (0: no slow start)
        self.latency = 0.0  # moving average of successful calls, seconds
        self.sampled_at = 0.0
        self.returned_at = time.monotonic()
        self.probe_task: asyncio.Task[None] | None = None
        self._requests = metrics.endpoint_requests.labels(backend, self.address)
        self._in_flight = metrics.endpoint_in_flight.labels(backend, self.address)

    def weight(self, now: float) -> float:
        """1, or less while in slow start."""
        if now >= self.warm_until:
            return 1.0
        span = self.warm_until - self.warm_from
        return max(SLOW_START_MIN_WEIGHT, (now - self.warm_from) / span)

    def recent_latency(self, now: float) -> float:
        """The latency average, faded by the time since this replica last answered."""
        idle = now - self.sampled_at
        if idle < 0.1:
            return self.latency
        return self.latency * math.exp(-idle / LATENCY_FADE_S)

    def observe(self, seconds: float, now: float, reference: float | None = None) -> None:
        """A successful call took ``seconds``. The first one sets the average, bounded by
        ``reference`` (the other replicas' average) like any later outlier."""
        if self.sampled_at:
            reference = self.latency
        if reference is not None:
            seconds = min(seconds, LATENCY_OUTLIER_FACTOR * reference + 0.001)
        if self.sampled_at:
            self.latency += LATENCY_ALPHA * (seconds - self.latency)
        else:
            self.latency = seconds
        self.sampled_at = now

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, {self.state}, outstanding={self.outstanding})"


class EndpointSet(Generic[T]):
    """The endpoints of one backend, and the choice of one per call.

    ``names`` are the (host, port) pairs to resolve (IP addresses stand for themselves);
    ``connect(host, port)`` makes an endpoint's transport and ``disconnect(transport)`` closes
    it; ``probe(transport)`` says whether a replica is healthy (a readiness call, never raises).
    """

    def __init__(
        self,
        backend: str,
        names: Iterable[tuple[str, int]],
        *,
        connect: Callable[[str, int], T],
        disconnect: Callable[[T], Awaitable[None]],
        probe: Callable[[T], Awaitable[bool]],
        what: str,
        metrics: Metrics | None = None,
        resolve_interval_s: float = 5.0,
        slow_start_s: float = 10.0,
        outlier: OutlierConfig | None = None,
        resolver: Resolver = resolve_host,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self.names = list(dict.fromkeys(names))
        self.what = what
        self._connect = connect
        self._disconnect = disconnect
        self._probe = probe
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.resolve_interval_s = resolve_interval_s
        self.slow_start_s = slow_start_s
        self.outlier = outlier or OutlierConfig.model_validate({})
        self._resolver = resolver
        self._rng = rng or random.Random()
        self.endpoints: dict[str, Endpoint[T]] = {}  # active and ejected, by address
        self.usable: list[Endpoint[T]] = []  # active ones: what calls are spread over
        self.on_join: list[Callable[[], None]] = []
        """Called, on the loop, whenever a replica enters rotation (joins, or returns from
        ejection): what holds calls back by the number of replicas may let more out."""
        self._draining: set[Endpoint[T]] = set()
        self._last_good: dict[tuple[str, int], list[str]] = {}
        self._resolve_failing: set[tuple[str, int]] = set()
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._resolve_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._dynamic = any(not is_ip(host) for host, _ in self.names)

    # -- membership -----------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the names once and, when any is a host name, keep resolving them."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started or self._closed:
                return
            await self.refresh(initial=True)
            if self._dynamic:
                self._resolve_task = asyncio.get_running_loop().create_task(self._resolve_loop())
            self._started = True

    async def refresh(self, initial: bool = False) -> None:
        """Resolve every name once and bring the endpoints in line with the answers."""
        wanted: list[tuple[str, int]] = []
        for name in self.names:
            wanted.extend((address, name[1]) for address in await self._resolve(name))
        self._apply(wanted, initial)

    async def _resolve(self, name: tuple[str, int]) -> list[str]:
        host, port = name
        if is_ip(host):
            return [host]
        try:
            async with asyncio.timeout(max(1.0, self.resolve_interval_s)):
                found = await self._resolver(host, port)
        except (OSError, TimeoutError) as error:
            result, detail = "error", f"{type(error).__name__}: {error}"
            found = []
        else:
            result, detail = ("ok", "") if found else ("empty", "no addresses")
        self.metrics.endpoint_resolutions.labels(self.backend, result).inc()
        if found:
            if name in self._resolve_failing:
                self._resolve_failing.discard(name)
                log.warning(
                    "backend %s: %s resolves again (%d addresses)", self.backend, host, len(found)
                )
            self._last_good[name] = found
            return found
        kept = self._last_good.get(name, [])
        if name not in self._resolve_failing:
            self._resolve_failing.add(name)
            log.warning(
                "backend %s: resolving %s failed (%s); keeping the last good set of %d addresses",
                self.backend,
                host,
                detail,
                len(kept),
            )
        return kept

    def _apply(self, wanted: list[tuple[str, int]], initial: bool) -> None:
        if self._closed:
            return
        now = time.monotonic()
        before = len(self.usable)
        keep = {endpoint_label(h, p): (h, p) for h, p in wanted}
        for address, (host, port) in keep.items():
            if address in self.endpoints:
                continue
            endpoint = Endpoint(host, port, self._connect(host, port), self.metrics, self.backend)
            # A newcomer's latency is unknown: take the others' average, not 0 (which would
            # make it look fastest of all).
            peers = self._peer_latency(endpoint)
            if peers is not None:
                endpoint.latency, endpoint.sampled_at = peers, now
            if not initial and self.slow_start_s > 0:
                endpoint.warm_from, endpoint.warm_until = now, now + self.slow_start_s
            self.endpoints[address] = endpoint
            self.usable.append(endpoint)
            self.metrics.endpoint_up.labels(self.backend, address).set(1)
            if not initial:
                log.info("backend %s: endpoint %s joined", self.backend, address)
        joined = len(self.usable) > before
        for address in [a for a in self.endpoints if a not in keep]:
            self._drain(self.endpoints.pop(address))
        self._count()
        if joined:
            self._joined()

    def _drain(self, endpoint: Endpoint[T]) -> None:
        log.info(
            "backend %s: endpoint %s left; draining %d calls in flight",
            self.backend,
            endpoint.address,
            endpoint.outstanding,
        )
        if endpoint in self.usable:
            self.usable.remove(endpoint)
        if endpoint.probe_task is not None:
            endpoint.probe_task.cancel()
        endpoint.state = "draining"
        self._draining.add(endpoint)
        # Series per endpoint live as long as the endpoint: bounded by the replica count.
        self.metrics.forget_endpoint(self.backend, endpoint.address)
        if endpoint.outstanding == 0:
            self._close_later(endpoint)

    def _close_later(self, endpoint: Endpoint[T]) -> None:
        self._draining.discard(endpoint)
        self._spawn(self._disconnect(endpoint.transport))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:  # noqa: BLE001 - housekeeping must never take the gateway down
                log.exception("backend %s: endpoint housekeeping failed", self.backend)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve_loop(self) -> None:
        while True:
            # Faster while there is nothing to call: a backend that was not up when the
            # gateway started is found soon after it is.
            await asyncio.sleep(self.resolve_interval_s if self.usable else 1.0)
            await self.refresh()

    def _joined(self) -> None:
        for callback in self.on_join:
            callback()

    def _count(self) -> None:
        counts = {"active": 0, "ejected": 0, "draining": len(self._draining)}
        for endpoint in self.endpoints.values():
            counts[endpoint.state] += 1
        for state, count in counts.items():
            self.metrics.backend_endpoints.labels(self.backend, state).set(count)

    # -- choosing -------------------------------------------------------------------------

    def pick(self, avoid: Collection[str] = ()) -> Endpoint[T]:
        """Power of two choices over least outstanding calls, outside ``avoid`` if possible."""
        candidates = self.usable
        if avoid:
            candidates = [e for e in candidates if e.address not in avoid] or candidates
        count = len(candidates)
        if count == 1:
            return candidates[0]
        if count == 0:
            raise Unavailable(
                f"the {self.what} backend has no replica to call (none resolved yet)",
                reason="no_endpoints",
            )
        rng = self._rng
        first = rng.randrange(count)
        second = rng.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = candidates[first], candidates[second]
        now = time.monotonic()
        # Slow start: a warming replica is passed over with the probability it lacks.
        if a.warm_until > now and rng.random() > a.weight(now):
            return b
        if b.warm_until > now and rng.random() > b.weight(now):
            return a
        cost_a = a.outstanding + 1.0
        cost_b = b.outstanding + 1.0
        latency_a, latency_b = a.recent_latency(now), b.recent_latency(now)
        if latency_a > SLOWER_BY * latency_b or latency_b > SLOWER_BY * latency_a:
            cost_a *= latency_a
            cost_b *= latency_b
        return a if cost_a <= cost_b else b

    async def call(self, work: Callable[[T], Awaitable[R]], avoid: Collection[str] = ()) -> R:
        """``work(transport)`` on the chosen endpoint, its outcome recorded. An error raised
        carries the endpoint's address (``error.endpoint``) so a retry can go elsewhere."""
        if not self._started:
            await self.start()
        endpoint = self.pick(avoid)
        endpoint.outstanding += 1
        endpoint._in_flight.inc()
        started = time.monotonic()
        try:
            result = await work(endpoint.transport)
        except DuoServeError as error:
            error.endpoint = endpoint.address
            if isinstance(error, ENDPOINT_FAULTS) and not isinstance(error, Overloaded):
                self._failed(endpoint, error)
            raise
        else:
            endpoint.failures = 0
            now = time.monotonic()
            if endpoint.sampled_at:
                endpoint.observe(now - started, now)
            else:
                endpoint.observe(now - started, now, self._peer_latency(endpoint))
            return result
        finally:
            endpoint.outstanding -= 1
            endpoint._in_flight.dec()
            endpoint._requests.inc()
            if endpoint.state == "draining" and endpoint.outstanding == 0:
                self._close_later(endpoint)

    def _peer_latency(self, endpoint: Endpoint[T]) -> float | None:
        """The average latency of the other replicas that have answered, if any."""
        known = [e.latency for e in self.usable if e is not endpoint and e.sampled_at]
        return sum(known) / len(known) if known else None

    async def first(self, work: Callable[[T], Awaitable[bool]]) -> bool:
        """Whether ``work`` (a probe) says yes on any endpoint in rotation, least loaded first."""
        if not self._started:
            await self.start()
        for endpoint in sorted(self.usable, key=lambda e: e.outstanding):
            if await work(endpoint.transport):
                return True
        return False

    def healthy_elsewhere(self, failed: str | None) -> bool:
        """Whether an endpoint in rotation other than ``failed`` has not failed its last call:
        then one replica's failure says nothing about the backend as a whole."""
        return any(e.failures == 0 and e.address != failed for e in self.usable)

    # -- outliers -------------------------------------------------------------------------

    def _failed(self, endpoint: Endpoint[T], error: DuoServeError) -> None:
        endpoint.failures += 1
        self.metrics.endpoint_failures.labels(self.backend, endpoint.address, error.reason).inc()
        if endpoint.state != "active" or endpoint.failures < self.outlier.consecutive_failures:
            return
        total = len(self.endpoints)
        ejected = total - len(self.usable)
        if ejected + 1 > total * self.outlier.max_ejected_percent // 100:
            return  # too many out already: this one stays, and the breaker sees the failures
        self._eject(endpoint, error)

    def _eject(self, endpoint: Endpoint[T], error: DuoServeError) -> None:
        now = time.monotonic()
        if now - endpoint.returned_at > self.outlier.max_ejection_s:
            endpoint.ejections = 0  # healthy for long enough: forgiven
        endpoint.ejections += 1
        duration = min(
            self.outlier.base_ejection_s * endpoint.ejections, self.outlier.max_ejection_s
        )
        endpoint.state = "ejected"
        endpoint.ejected_until = now + duration
        self.usable.remove(endpoint)
        self.metrics.endpoint_up.labels(self.backend, endpoint.address).set(0)
        self.metrics.endpoint_ejections.labels(self.backend, endpoint.address).inc()
        self._count()
        log.warning(
            "backend %s: endpoint %s ejected for %.1f s after %d failures in a row (last: %s)",
            self.backend,
            endpoint.address,
            duration,
            endpoint.failures,
            error.reason,
        )
        endpoint.probe_task = asyncio.get_running_loop().create_task(
            self._probe_until_back(endpoint, duration)
        )

    async def _probe_until_back(self, endpoint: Endpoint[T], wait_s: float) -> None:
        """Probe an ejected endpoint over a fresh transport each time (a gRPC channel that saw
        its server die backs off reconnecting for seconds; a pool may hold dead connections);
        the transport of the probe that passes replaces the old one."""
        await asyncio.sleep(wait_s)
        while endpoint.state == "ejected" and not self._closed:
            fresh = self._connect(endpoint.host, endpoint.port)
            try:
                healthy = await self._probe(fresh)
            except Exception:  # noqa: BLE001 - a probe that breaks is a failed probe
                healthy = False
            if healthy and endpoint.state == "ejected" and not self._closed:
                self._spawn(self._disconnect(endpoint.transport))
                endpoint.transport = fresh
                self._return(endpoint)
                return
            await self._disconnect(fresh)
            await asyncio.sleep(self.outlier.base_ejection_s)

    def _return(self, endpoint: Endpoint[T]) -> None:
        now = time.monotonic()
        endpoint.state = "active"
        endpoint.failures = 0
        endpoint.returned_at = now
        endpoint.probe_task = None
        if self.slow_start_s > 0:
            endpoint.warm_from, endpoint.warm_until = now, now + self.slow_start_s
        self.usable.append(endpoint)
        self.metrics.endpoint_up.labels(self.backend, endpoint.address).set(1)
        self._count()
        self._joined()
        log.warning(
            "backend %s: endpoint %s is back after a passing probe", self.backend, endpoint.address
        )

    # -- shutdown -------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._resolve_task,) if t is not None]
        tasks += [e.probe_task for e in self.endpoints.values() if e.probe_task is not None]
        for task in tasks:
            task.cancel()
        endpoints = [*self.endpoints.values(), *self._draining]
        self.endpoints.clear()
        self.usable.clear()
        self._draining.clear()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(
            *(self._disconnect(e.transport) for e in endpoints), return_exceptions=True
        )
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class ReplicatedBackend(Backend, Generic[T]):
    """A remote backend whose calls go through an :class:`EndpointSet`: it says how to run one
    inference on one replica's transport (``infer_on``), the set picks the replica."""

    endpoints: EndpointSet[T]
    coalescer: Coalescer | None = None
    """Set (by ``coalesce``) when the backend's models.yaml entry has ``coalesce``."""

    def coalesce(self, config: CoalesceConfig | None) -> None:
        """Combine concurrent requests into fewer calls as ``config`` says (None: never).
        Called by the constructor once ``endpoints`` is set."""
        if config is None:
            self.coalescer = None
            return
        endpoints = self.endpoints
        self.coalescer = Coalescer(
            self.name,
            config,
            self._call_one,
            endpoints.metrics,
            endpoints.what,
            replicas=lambda: len(endpoints.usable),
        )
        # Its limit grows with the rotation: queued requests need not wait for a call to
        # return before a joining replica's share of calls goes out.
        endpoints.on_join.append(self.coalescer.pump_all)

    async def infer(
        self, request: InferenceRequest, deadline: Deadline, *, avoid: Collection[str] = ()
    ) -> InferenceResponse:
        # A retry that must avoid replicas goes on its own: combined calls pick their replica
        # once, for requests that have no replica to avoid.
        if self.coalescer is not None and not avoid:
            return await self.coalescer.infer(request, deadline)
        return await self._call_one(request, deadline, avoid)

    def _call_one(
        self, request: InferenceRequest, deadline: Deadline, avoid: Collection[str] = ()
    ) -> Awaitable[InferenceResponse]:
        """One call on a replica the set picks (none of ``avoid``): the set's own coroutine,
        awaited by the caller (no extra frame on every call)."""
        return self.endpoints.call(
            lambda transport: self.infer_on(transport, request, deadline), avoid
        )

    @abstractmethod
    async def infer_on(
        self, transport: T, request: InferenceRequest, deadline: Deadline
    ) -> InferenceResponse:
        """One inference on the replica behind ``transport``."""

    async def start(self) -> None:
        await self.endpoints.start()

    async def close(self) -> None:
        if self.coalescer is not None:
            await self.coalescer.close()
        await self.endpoints.close()

    def healthy_elsewhere(self, endpoint: str | None) -> bool:
        return self.endpoints.healthy_elsewhere(endpoint)


def endpoint_names(
    endpoints: list[str] | None, default: tuple[str, int] | None
) -> list[tuple[str, int]]:
    """The (host, port) names of a backend's replicas: its ``endpoints`` list, else the host
    and port of its address."""
    if endpoints:
        return [split_host_port(entry) for entry in endpoints]
    if default is None:
        raise ValueError("a remote backend needs an address or endpoints")
    return [default]
