"""The replica set of a remote backend (backends/endpoints.py): resolution, per-request choice,
slow start, outlier ejection and return, draining. Transports here are plain objects: what is
tested is which replica a call goes to; tests/integration/test_scale_out.py does the same over
real servers."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from duoserve.backends.endpoints import EndpointSet, resolve_host, split_host_port
from duoserve.config import OutlierConfig
from duoserve.errors import BadRequest, Overloaded, Unavailable, UpstreamError
from duoserve.metrics import Metrics
from tests.timing import eventually


class Replica:
    """A fake transport: remembers whether it was closed; replicas whose address is in
    ``down`` fail their health probes."""

    down: set[str] = set()

    def __init__(self, host: str, port: int) -> None:
        self.address = f"{host}:{port}"
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class Names:
    """A resolver whose answers the test sets."""

    def __init__(self, **answers: list[str]) -> None:
        self.answers: dict[str, list[str] | Exception] = dict(answers)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


async def probe(replica: Replica) -> bool:
    return replica.address not in Replica.down


def endpoint_set(
    names: list[tuple[str, int]],
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
    *,
    metrics: Metrics | None = None,
    outlier: dict[str, float] | None = None,
    **options: float,
) -> EndpointSet[Replica]:
    return EndpointSet(
        "ts",
        names,
        connect=Replica,
        disconnect=Replica.close,
        probe=probe,
        what="TorchServe",
        metrics=metrics,
        outlier=OutlierConfig.model_validate(outlier or {}),
        resolver=resolver or resolve_host,
        rng=random.Random(7),
        **options,  # type: ignore[arg-type]
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


async def answer(replica: Replica) -> str:
    await asyncio.sleep(0)
    return replica.address


async def test_ip_addresses_are_endpoints_without_any_resolving() -> None:
    names = Names()
    endpoints = endpoint_set([("10.0.0.1", 8080), ("10.0.0.2", 8080)], names)
    await endpoints.start()
    assert sorted(e.address for e in endpoints.usable) == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert names.calls == 0
    await endpoints.close()


async def test_a_name_becomes_every_address_it_resolves_to() -> None:
    names = Names(torchserve=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    endpoints = endpoint_set([("torchserve", 8080)], names)
    await endpoints.start()
    assert sorted(e.address for e in endpoints.usable) == [
        "10.0.0.1:8080",
        "10.0.0.2:8080",
        "10.0.0.3:8080",
    ]
    await endpoints.close()


async def test_localhost_resolves_through_the_system_resolver() -> None:
    addresses = await resolve_host("localhost", 80)
    assert addresses and all(a in ("127.0.0.1", "::1") for a in addresses)
    assert len({":" in a for a in addresses}) == 1  # one address family only


def test_host_port_entries_split_ipv6_too() -> None:
    assert split_host_port("tfserving-0.tfserving:8500") == ("tfserving-0.tfserving", 8500)
    assert split_host_port("[fd00::1]:8500") == ("fd00::1", 8500)


async def test_calls_spread_evenly_over_equal_replicas() -> None:
    endpoints = endpoint_set([("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    counts: Counter[str] = Counter()

    async def client() -> None:
        for _ in range(300):
            counts[await endpoints.call(answer)] += 1

    await asyncio.gather(*(client() for _ in range(8)))
    assert sum(counts.values()) == 2400
    for address, count in counts.items():
        assert abs(count - 800) < 0.15 * 800, (address, counts)
    await endpoints.close()


async def test_a_replica_with_calls_piling_up_gets_fewer_new_ones() -> None:
    endpoints = endpoint_set([("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    counts: Counter[str] = Counter()

    async def slow_on_one(replica: Replica) -> str:
        # 10.0.0.1 takes ten times as long as the others.
        await asyncio.sleep(0.01 if replica.address == "10.0.0.1:1" else 0.001)
        return replica.address

    async def client() -> None:
        for _ in range(40):
            counts[await endpoints.call(slow_on_one)] += 1

    await asyncio.gather(*(client() for _ in range(8)))
    fair = sum(counts.values()) / 3
    assert counts["10.0.0.1:1"] < fair / 2, counts
    await endpoints.close()


async def test_a_slow_replica_gets_few_calls_even_one_at_a_time() -> None:
    """Calls in flight cannot tell a slow replica at concurrency 1 (all have none); its
    latency can."""
    endpoints = endpoint_set([("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    counts: Counter[str] = Counter()

    async def slow_on_one(replica: Replica) -> str:
        await asyncio.sleep(0.01 if replica.address == "10.0.0.1:1" else 0.002)
        return replica.address

    for _ in range(150):
        counts[await endpoints.call(slow_on_one)] += 1
    assert counts["10.0.0.1:1"] < 150 / 3 / 2, counts
    await endpoints.close()


async def test_a_retry_avoids_the_replicas_that_failed_it() -> None:
    endpoints = endpoint_set([("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    for _ in range(50):
        chosen = await endpoints.call(answer, avoid=["10.0.0.1:1", "10.0.0.3:1"])
        assert chosen == "10.0.0.2:1"
    # Nothing left to avoid with: still served, by anyone.
    assert await endpoints.call(answer, avoid=["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"])
    await endpoints.close()


async def test_an_error_names_the_replica_that_failed() -> None:
    endpoints = endpoint_set([("10.0.0.9", 1)])

    async def refuse(replica: Replica) -> str:
        raise Unavailable("down", reason="backend_down")

    with pytest.raises(Unavailable) as raised:
        await endpoints.call(refuse)
    assert raised.value.endpoint == "10.0.0.9:1"
    await endpoints.close()


async def test_consecutive_failures_eject_a_replica_and_a_probe_brings_it_back() -> None:
    metrics = Metrics(CollectorRegistry())
    endpoints = endpoint_set(
        [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)],
        metrics=metrics,
        outlier={"consecutive_failures": 3, "base_ejection_s": 0.05},
        slow_start_s=0,
    )
    await endpoints.start()
    joins: list[int] = []  # what the set tells its listeners (a coalescer) on each return
    endpoints.on_join.append(lambda: joins.append(len(endpoints.usable)))
    bad = endpoints.endpoints["10.0.0.2:1"]
    old_transport = bad.transport
    Replica.down.add(bad.address)

    async def fails_on_bad(replica: Replica) -> str:
        if replica.address == bad.address:
            raise UpstreamError("HTTP 500")
        return replica.address

    for _ in range(3):
        with pytest.raises(UpstreamError):
            await endpoints.call(fails_on_bad, avoid=["10.0.0.1:1", "10.0.0.3:1"])
    assert bad.state == "ejected"
    assert bad not in endpoints.usable
    assert sample(metrics, "duoserve_endpoint_up", backend="ts", endpoint="10.0.0.2:1") == 0
    assert sample(metrics, "duoserve_endpoint_ejections_total", backend="ts",
                  endpoint="10.0.0.2:1") == 1  # fmt: skip
    # Ejected: no call reaches it, even when asked to avoid every other replica.
    for _ in range(30):
        assert await endpoints.call(fails_on_bad, avoid=["10.0.0.1:1"]) != "10.0.0.2:1"
    # Its ejection time passes, but its probe fails: it stays out.
    await asyncio.sleep(0.2)
    assert bad.state == "ejected"
    assert joins == []
    Replica.down.clear()
    await eventually(lambda: bad.state == "active", "the replica returning after its probe", 2)
    assert joins == [3]  # told once, with the replica back in rotation
    # It comes back on the fresh transport its probe used; the old one is closed.
    assert bad.transport is not old_transport
    await eventually(lambda: old_transport.closed, "the old transport closing", 2)
    assert sample(metrics, "duoserve_endpoint_up", backend="ts", endpoint="10.0.0.2:1") == 1
    await endpoints.close()


async def test_ejection_grows_with_each_ejection_up_to_the_cap() -> None:
    endpoints = endpoint_set(
        [("10.0.0.1", 1), ("10.0.0.2", 1)],
        outlier={"consecutive_failures": 1, "base_ejection_s": 10, "max_ejection_s": 25},
    )
    await endpoints.start()
    bad = endpoints.endpoints["10.0.0.1:1"]

    async def fail(replica: Replica) -> str:
        raise Unavailable("refused", reason="backend_down")

    spans = []
    for _ in range(3):
        with pytest.raises(Unavailable):
            await endpoints.call(fail, avoid=["10.0.0.2:1"])
        assert bad.state == "ejected"
        spans.append(bad.ejected_until - time.monotonic())
        endpoints._return(bad)  # as a passing probe would, at once
    assert [round(s) for s in spans] == [10, 20, 25]
    await endpoints.close()


async def test_never_more_than_half_the_replicas_are_ejected() -> None:
    endpoints = endpoint_set(
        [("10.0.0.1", 1), ("10.0.0.2", 1)], outlier={"consecutive_failures": 2}
    )

    async def fail(replica: Replica) -> str:
        raise Unavailable("refused", reason="backend_down")

    for _ in range(10):
        with pytest.raises(Unavailable):
            await endpoints.call(fail)
    assert [e.state for e in endpoints.endpoints.values()].count("ejected") == 1
    assert len(endpoints.usable) == 1
    # Both failing: no healthy replica elsewhere, so the backend's breaker must count this.
    assert not endpoints.healthy_elsewhere(endpoints.usable[0].address)
    await endpoints.close()


async def test_a_lone_replica_is_never_ejected() -> None:
    endpoints = endpoint_set([("10.0.0.1", 1)], outlier={"consecutive_failures": 1})

    async def fail(replica: Replica) -> str:
        raise Unavailable("refused", reason="backend_down")

    for _ in range(5):
        with pytest.raises(Unavailable):
            await endpoints.call(fail)
    assert endpoints.usable and endpoints.usable[0].state == "active"
    await endpoints.close()


async def test_client_errors_and_capacity_answers_do_not_count_towards_ejection() -> None:
    endpoints = endpoint_set(
        [("10.0.0.1", 1), ("10.0.0.2", 1)], outlier={"consecutive_failures": 1}
    )
    errors: list[Exception] = [BadRequest("bad input"), Overloaded("queue full")]
    for error in errors:

        async def raise_it(replica: Replica, error: Exception = error) -> str:
            raise error

        with pytest.raises(type(error)):
            await endpoints.call(raise_it)
    assert all(e.state == "active" for e in endpoints.endpoints.values())
    assert endpoints.healthy_elsewhere(None)
    await endpoints.close()


async def test_healthy_elsewhere_is_about_other_replicas() -> None:
    endpoints = endpoint_set(
        [("10.0.0.1", 1), ("10.0.0.2", 1)], outlier={"consecutive_failures": 100}
    )

    async def fail(replica: Replica) -> str:
        raise Unavailable("refused", reason="backend_down")

    with pytest.raises(Unavailable):
        await endpoints.call(fail, avoid=["10.0.0.2:1"])
    assert endpoints.healthy_elsewhere("10.0.0.1:1")  # 10.0.0.2 has not failed
    with pytest.raises(Unavailable):
        await endpoints.call(fail, avoid=["10.0.0.1:1"])
    assert not endpoints.healthy_elsewhere("10.0.0.2:1")  # both failing now
    await endpoints.call(answer, avoid=["10.0.0.1:1"])  # a success clears 10.0.0.2
    assert endpoints.healthy_elsewhere("10.0.0.1:1")
    await endpoints.close()


async def test_a_replica_that_joins_ramps_up_over_the_slow_start() -> None:
    names = Names(ts=["10.0.0.1", "10.0.0.2"])
    endpoints = endpoint_set([("ts", 1)], names, slow_start_s=0.6, resolve_interval_s=3600)
    await endpoints.start()
    names.answers["ts"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    await endpoints.refresh()
    new = endpoints.endpoints["10.0.0.3:1"]
    assert new.weight(time.monotonic()) == pytest.approx(0.1, abs=0.05)

    counts: dict[str, Counter[str]] = {"early": Counter(), "late": Counter()}

    async def held(replica: Replica) -> str:
        await asyncio.sleep(0.005)
        return replica.address

    async def client(phase: str, n: int) -> None:
        for _ in range(n):
            counts[phase][await endpoints.call(held)] += 1

    await asyncio.gather(*(client("early", 10) for _ in range(6)))
    await asyncio.sleep(max(0.0, new.warm_until - time.monotonic()))
    assert new.weight(time.monotonic()) == 1.0
    await asyncio.gather(*(client("late", 10) for _ in range(6)))
    early = counts["early"]["10.0.0.3:1"] / sum(counts["early"].values())
    late = counts["late"]["10.0.0.3:1"] / sum(counts["late"].values())
    assert early < 0.2 < late, counts
    await endpoints.close()


async def test_a_replica_that_leaves_finishes_its_calls_then_closes() -> None:
    names = Names(ts=["10.0.0.1", "10.0.0.2"])
    metrics = Metrics(CollectorRegistry())
    endpoints = endpoint_set([("ts", 1)], names, metrics=metrics, resolve_interval_s=3600)
    await endpoints.start()
    leaving = endpoints.endpoints["10.0.0.2:1"]
    release = asyncio.Event()

    async def slow(replica: Replica) -> str:
        await release.wait()
        return replica.address

    in_flight = asyncio.create_task(endpoints.call(slow, avoid=["10.0.0.1:1"]))
    await eventually(lambda: leaving.outstanding == 1, "the call on the leaving replica", 2)
    names.answers["ts"] = ["10.0.0.1"]
    await endpoints.refresh()
    assert leaving.state == "draining" and not leaving.transport.closed
    for _ in range(20):
        assert await endpoints.call(answer) == "10.0.0.1:1"
    assert sample(metrics, "duoserve_endpoint_up", backend="ts", endpoint="10.0.0.2:1") is None
    release.set()
    assert await in_flight == "10.0.0.2:1"
    await eventually(lambda: leaving.transport.closed, "the drained replica closing", 2)
    await endpoints.close()


async def test_a_failing_or_empty_resolver_keeps_the_last_good_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = Names(ts=["10.0.0.1", "10.0.0.2"])
    metrics = Metrics(CollectorRegistry())
    endpoints = endpoint_set([("ts", 1)], names, metrics=metrics, resolve_interval_s=3600)
    await endpoints.start()
    caplog.set_level(logging.WARNING, logger="duoserve.backends.endpoints")

    names.answers["ts"] = OSError("Temporary failure in name resolution")
    await endpoints.refresh()
    names.answers["ts"] = []
    await endpoints.refresh()
    assert sorted(endpoints.endpoints) == ["10.0.0.1:1", "10.0.0.2:1"]
    assert "keeping the last good set of 2 addresses" in caplog.text
    assert sample(metrics, "duoserve_endpoint_resolutions_total", backend="ts",
                  result="error") == 1  # fmt: skip
    assert sample(metrics, "duoserve_endpoint_resolutions_total", backend="ts",
                  result="empty") == 1  # fmt: skip
    names.answers["ts"] = ["10.0.0.2"]
    await endpoints.refresh()
    assert sorted(endpoints.endpoints) == ["10.0.0.2:1"]
    assert "resolves again" in caplog.text
    await endpoints.close()


async def test_a_backend_not_resolvable_at_start_is_found_later() -> None:
    names = Names(ts=OSError("NXDOMAIN"))
    endpoints = endpoint_set([("ts", 1)], names, resolve_interval_s=0.05)
    await endpoints.start()
    with pytest.raises(Unavailable) as raised:
        await endpoints.call(answer)
    assert raised.value.reason == "no_endpoints"
    names.answers["ts"] = ["10.0.0.1"]
    # While nothing resolves, names are retried every second whatever the interval.
    await eventually(lambda: bool(endpoints.usable), "the replica being found", 3)
    assert await endpoints.call(answer) == "10.0.0.1:1"
    await endpoints.close()


async def test_close_closes_every_transport_and_stops_resolving() -> None:
    names = Names(ts=["10.0.0.1", "10.0.0.2"])
    endpoints = endpoint_set([("ts", 1)], names, resolve_interval_s=0.01)
    await endpoints.start()
    transports = [e.transport for e in endpoints.endpoints.values()]
    await endpoints.close()
    assert all(t.closed for t in transports)
    calls = names.calls
    await asyncio.sleep(0.05)
    assert names.calls == calls
