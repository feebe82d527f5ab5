"""The data plane's failure handling: shadow isolation, failover, circuit breaker, retries.

The failure modes (a backend that hangs, refuses, or answers garbage) are simulated with small
Backend subclasses; the healthy side is the real embedded runtime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from duoserve.app import build_backends, create_app
from duoserve.backends.base import Backend
from duoserve.config import parse_config
from duoserve.errors import Unavailable, UpstreamError
from duoserve.resilience import Deadline
from duoserve.settings import Settings
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor
from tests.conftest import GatewayFactory, digits_model, embedded_config, v2_body
from tests.servers import REPO
from tests.timing import eventually

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

IMAGES = (np.arange(3 * 64, dtype=np.float32) % 17).reshape(3, 8, 8)
LOCAL = embedded_config()["backends"]["local"]


# -- simulated backends ----------------------------------------------------------------------


class FakeBackend(Backend):
    """Counts calls; subclasses decide how each call ends."""

    kind = "fake"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls = 0

    async def infer(
        self, request: InferenceRequest, deadline: Deadline, *, avoid: Collection[str] = ()
    ) -> InferenceResponse:
        self.calls += 1
        return await self.answer(request, deadline)

    async def answer(self, request: InferenceRequest, deadline: Deadline) -> InferenceResponse:
        rows = request.batch_size()
        probabilities = np.full((rows, 10), 0.1, dtype=np.float32)
        return InferenceResponse(
            model_name=request.model,
            model_version="1",
            outputs=[Tensor.from_array("probabilities", probabilities)],
        )

    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        return True


class HangingBackend(FakeBackend):
    """Never answers until the test lets it go."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()

    async def answer(self, request: InferenceRequest, deadline: Deadline) -> InferenceResponse:
        await self.release.wait()
        raise Unavailable("released by the test")


class FailingBackend(FakeBackend):
    """Every call fails with the given error."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(name)
        self.error = error

    async def answer(self, request: InferenceRequest, deadline: Deadline) -> InferenceResponse:
        raise self.error


class FlakyBackend(FakeBackend):
    """Refuses the first ``failures`` calls (not processed: safe to retry), then answers."""

    def __init__(self, name: str, failures: int) -> None:
        super().__init__(name)
        self.failures = failures

    async def answer(self, request: InferenceRequest, deadline: Deadline) -> InferenceResponse:
        if self.calls <= self.failures:
            raise Unavailable("connection refused by the flaky backend", reason="backend_down")
        return await super().answer(request, deadline)


class SlowBackend(FakeBackend):
    """Takes ``delay_s``, honouring the deadline as the Backend contract asks."""

    def __init__(self, name: str, delay_s: float) -> None:
        super().__init__(name)
        self.delay_s = delay_s

    async def answer(self, request: InferenceRequest, deadline: Deadline) -> InferenceResponse:
        await asyncio.sleep(min(self.delay_s, deadline.remaining()))
        deadline.check("the slow backend")
        return await super().answer(request, deadline)


def fake_backend_config(**extra: Any) -> dict[str, Any]:
    """A backends entry for a simulated backend (its kind only picks the config schema)."""
    return {"kind": "v2", "url": "http://127.0.0.1:9", **extra}


@asynccontextmanager
async def serve(
    config: dict[str, Any], fakes: dict[str, Backend]
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """An in-process gateway whose backends named in ``fakes`` are simulated."""
    parsed = parse_config(config)
    backends = build_backends(parsed, REPO)
    backends.update(fakes)
    app = create_app(
        Settings(config=str(REPO / "models.yaml")),
        config=parsed,
        registry=CollectorRegistry(),
        backends=backends,
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app


def sample(app: Any, name: str, **labels: str) -> float | None:
    value: float | None = app.state.gateway.metrics.registry.get_sample_value(name, labels)
    return value


def _digits(routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return digits_model([{"model": "digits", **r} for r in routes], **extra)


# -- shadow ----------------------------------------------------------------------------------


async def test_hanging_shadow_never_delays_the_primary() -> None:
    shadow = HangingBackend("shadow")
    config = {
        "backends": {"local": LOCAL, "shadow": fake_backend_config(retries=0, timeout_ms=5000)},
        "models": {
            "digits": _digits(
                [{"backend": "local", "framework": "pytorch"}],
                shadow={"backend": "shadow", "framework": "tensorflow"},
            )
        },
    }
    async with serve(config, {"shadow": shadow}) as (client, app):
        await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))  # warm up
        # The shadow hangs until released: a primary that waited for it would never answer.
        response = await asyncio.wait_for(
            client.post("/v2/models/digits/infer", json=v2_body(IMAGES)), 30
        )
        assert response.status_code == 200
        assert response.headers["x-duoserve-framework"] == "pytorch"
        await eventually(lambda: shadow.calls == 2, "both shadow copies sent")
        assert not shadow.release.is_set()  # ... and both still hanging
        assert (
            sample(
                app,
                "duoserve_shadow_requests_total",
                model="digits",
                framework="tensorflow",
                code="200",
            )
            is None
        )
        shadow.release.set()
        await app.state.gateway.dataplane.wait_shadows()
        assert (
            sample(
                app,
                "duoserve_shadow_requests_total",
                model="digits",
                framework="tensorflow",
                code="503",
            )
            == 2
        )


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamError("the shadow answered garbage"), "502"),
        (Unavailable("the shadow refused the connection"), "503"),
        (RuntimeError("a bug in the shadow backend"), "502"),
    ],
    ids=["upstream-error", "unavailable", "unexpected"],
)
async def test_failing_shadow_never_fails_the_primary(error: Exception, code: str) -> None:
    shadow = FailingBackend("shadow", error)
    config = {
        "backends": {"local": LOCAL, "shadow": fake_backend_config(retries=0)},
        "models": {
            "digits": _digits(
                [{"backend": "local", "framework": "pytorch"}],
                shadow={"backend": "shadow", "framework": "tensorflow"},
            )
        },
    }
    async with serve(config, {"shadow": shadow}) as (client, app):
        for _ in range(3):
            response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
            assert response.status_code == 200
            assert response.json()["outputs"][0]["shape"] == [3, 10]
        await app.state.gateway.dataplane.wait_shadows()
        assert shadow.calls == 3
        assert (
            sample(
                app,
                "duoserve_shadow_requests_total",
                model="digits",
                framework="tensorflow",
                code=code,
            )
            == 3
        )
        # The primary's own numbers are untouched by the shadow's failures.
        assert (
            sample(
                app,
                "duoserve_requests_total",
                model="digits",
                framework="pytorch",
                backend="local",
                protocol="v2",
                code="200",
            )
            == 3
        )


async def test_shadow_agreement_between_the_real_frameworks(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images = digits_samples[0][:10]
    config = embedded_config(
        digits=_digits(
            [{"backend": "local", "framework": "pytorch"}],
            shadow={"backend": "local", "framework": "tensorflow", "model": "digits"},
        )
    )
    async with gateway(config) as (client, app):
        for _ in range(3):
            response = await client.post("/v2/models/digits/infer", json=v2_body(images))
            assert response.status_code == 200
            assert response.headers["x-duoserve-framework"] == "pytorch"
        await app.state.gateway.dataplane.wait_shadows()
        labels = {"model": "digits", "framework": "tensorflow"}
        assert sample(app, "duoserve_shadow_requests_total", code="200", **labels) == 3
        assert sample(app, "duoserve_shadow_compared_items_total", **labels) == 30
        assert sample(app, "duoserve_shadow_disagreeing_items_total", **labels) == 0
        assert not sample(app, "duoserve_shadow_disagreements_total", **labels)
        assert sample(app, "duoserve_shadow_max_abs_diff_count", **labels) == 3
        assert sample(app, "duoserve_shadow_max_abs_diff_sum", **labels) < 3e-4
        # A shadow answer is never counted as a served request.
        assert (
            sample(
                app,
                "duoserve_requests_total",
                model="digits",
                framework="tensorflow",
                backend="local",
                protocol="v2",
                code="200",
            )
            is None
        )


# -- failover --------------------------------------------------------------------------------


def _failover_config(failover: bool) -> dict[str, Any]:
    return {
        "backends": {"local": LOCAL, "down": fake_backend_config(retries=0)},
        "models": {
            "digits": _digits(
                [
                    {"backend": "down", "framework": "pytorch", "weight": 1},
                    {"backend": "local", "framework": "tensorflow", "weight": 0},
                ],
                failover=failover,
            )
        },
    }


def _refusing() -> FailingBackend:
    return FailingBackend(
        "down", Unavailable("the pytorch backend refused the connection", reason="backend_down")
    )


async def test_failover_to_the_other_route() -> None:
    down = _refusing()
    async with serve(_failover_config(True), {"down": down}) as (client, app):
        response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
        assert response.status_code == 200, response.text
        assert response.headers["x-duoserve-framework"] == "tensorflow"
        assert response.headers["x-duoserve-backend"] == "local"
        assert down.calls == 1
        assert sample(app, "duoserve_failovers_total", model="digits", framework="tensorflow") == 1
        assert (
            sample(
                app,
                "duoserve_backend_errors_total",
                model="digits",
                backend="down",
                framework="pytorch",
                reason="backend_down",
            )
            == 1
        )


async def test_pinned_request_does_not_fail_over_to_another_framework() -> None:
    down = _refusing()
    async with serve(_failover_config(True), {"down": down}) as (client, app):
        response = await client.post(
            "/v2/models/digits/infer",
            json=v2_body(IMAGES),
            headers={"x-duoserve-framework": "pytorch"},
        )
        assert response.status_code == 503
        assert "refused the connection" in response.json()["error"]
        assert (
            sample(app, "duoserve_failovers_total", model="digits", framework="tensorflow") is None
        )


async def test_no_failover_answers_503_with_the_reason() -> None:
    down = _refusing()
    async with serve(_failover_config(False), {"down": down}) as (client, app):
        response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
        assert response.status_code == 503
        assert response.json() == {"error": "the pytorch backend refused the connection"}
        assert response.headers["retry-after"] == "1"
        assert "x-duoserve-framework" not in response.headers
        assert down.calls == 1
        assert (
            sample(app, "duoserve_failovers_total", model="digits", framework="tensorflow") is None
        )
        # Counted against the route that failed.
        assert (
            sample(
                app,
                "duoserve_requests_total",
                model="digits",
                framework="pytorch",
                backend="down",
                protocol="v2",
                code="503",
            )
            == 1
        )


# -- circuit breaker -------------------------------------------------------------------------


async def test_circuit_opens_after_five_failures() -> None:
    broken = FailingBackend("broken", UpstreamError("the backend answered with garbage"))
    config = {
        "backends": {"broken": fake_backend_config(retries=1)},
        "models": {"digits": _digits([{"backend": "broken", "framework": "pytorch"}])},
    }
    async with serve(config, {"broken": broken}) as (client, app):
        for _ in range(5):
            response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
            assert response.status_code == 502
            assert response.json() == {"error": "the backend answered with garbage"}
        assert broken.calls == 5  # a backend that answered is not retried
        assert sample(app, "duoserve_circuit_state", backend="broken") == 2

        response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
        assert response.status_code == 503
        assert "circuit is open" in response.json()["error"]
        assert int(response.headers["retry-after"]) >= 1
        assert broken.calls == 5  # not called while open
        assert (
            sample(
                app,
                "duoserve_backend_errors_total",
                model="digits",
                backend="broken",
                framework="pytorch",
                reason="circuit_open",
            )
            == 1
        )

        ready = await client.get("/v2/health/ready")
        # A remote backend's outage is reported, not turned into this replica's unreadiness.
        assert ready.status_code == 200
        assert ready.json()["circuits"] == {"broken": "open"}
        assert ready.json()["models"] == {"digits": False}


async def test_unexpected_backend_exception_becomes_a_clean_502() -> None:
    broken = FailingBackend("broken", RuntimeError("token=abc123 at /srv/secret/path"))
    config = {
        "backends": {"broken": fake_backend_config()},
        "models": {"digits": _digits([{"backend": "broken", "framework": "pytorch"}])},
    }
    async with serve(config, {"broken": broken}) as (client, _):
        response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
        assert response.status_code == 502
        error = response.json()["error"]
        assert "pytorch backend failed" in error
        assert "abc123" not in error and "/srv" not in error


# -- retries, deadlines, limits --------------------------------------------------------------


def _single(backend: str, **backend_extra: Any) -> dict[str, Any]:
    return {
        "backends": {backend: fake_backend_config(**backend_extra)},
        "models": {"digits": _digits([{"backend": backend, "framework": "pytorch"}])},
    }


async def test_unprocessed_call_is_retried_within_budget() -> None:
    flaky = FlakyBackend("flaky", failures=1)
    async with serve(_single("flaky", retries=1), {"flaky": flaky}) as (client, app):
        response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
        assert response.status_code == 200, response.text
        assert flaky.calls == 2
        assert sample(app, "duoserve_retries_total", backend="flaky", reason="backend_down") == 1


async def test_retries_stop_at_the_configured_count() -> None:
    flaky = FlakyBackend("flaky", failures=5)
    async with serve(_single("flaky", retries=2), {"flaky": flaky}) as (client, app):
        response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
        assert response.status_code == 503
        assert "connection refused" in response.json()["error"]
        assert flaky.calls == 3
        assert sample(app, "duoserve_retries_total", backend="flaky", reason="backend_down") == 2


async def test_no_retry_when_the_budget_is_spent() -> None:
    flaky = FlakyBackend("flaky", failures=1)
    async with serve(_single("flaky", retries=1), {"flaky": flaky}) as (client, app):
        budget = app.state.gateway.dataplane.retry_budget
        budget.retrying = budget.minimum  # other requests are retrying already
        response = await client.post("/v2/models/digits/infer", json=v2_body(IMAGES))
        assert response.status_code == 503
        assert flaky.calls == 1
        assert sample(app, "duoserve_retries_total", backend="flaky", reason="backend_down") is None


async def test_client_timeout_header_bounds_the_backend_call() -> None:
    slow = SlowBackend("slow", delay_s=5)
    async with serve(_single("slow", timeout_ms=10_000), {"slow": slow}) as (client, _):
        started = time.perf_counter()
        response = await client.post(
            "/v2/models/digits/infer",
            json=v2_body(IMAGES),
            headers={"x-duoserve-timeout-ms": "100"},
        )
        # At the client's 100 ms, not the model's 10 s (after which the backend would have
        # answered 200 at its 5 s pace), and not before it.
        assert time.perf_counter() - started >= 0.1
        assert response.status_code == 504
        assert "deadline of 100 ms" in response.json()["error"]


async def test_model_concurrency_limit_sheds_the_excess() -> None:
    slow = SlowBackend("slow", delay_s=0.3)
    config = _single("slow")
    config["models"]["digits"]["max_concurrency"] = 1
    async with serve(config, {"slow": slow}) as (client, app):
        responses = await asyncio.gather(
            *(client.post("/v2/models/digits/infer", json=v2_body(IMAGES)) for _ in range(3))
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 503]  # one served, one queued then served, one shed
        shed = next(r for r in responses if r.status_code == 503)
        assert "model 'digits' is at its concurrency limit" in shed.json()["error"]
        assert (
            sample(app, "duoserve_shed_requests_total", model="digits", reason="model_concurrency")
            == 1
        )
