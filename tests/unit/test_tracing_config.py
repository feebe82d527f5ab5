"""Tracing's configuration by the standard OTEL_* variables, and a gateway installed without the
``tracing`` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from duoserve.cli import main
from duoserve.tracing import TracingConfigError, forwarded, traces_endpoint, valid_traceparent
from tests.servers import REPO

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}, "http://otel:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318/"}, "http://otel:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/in",
            },
            "https://traces.example/in",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.01",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "http://otel:4318/v1/traces",
        ),
    ],
)
def test_tracing_is_on_only_when_an_otlp_endpoint_is_set(
    environ: dict[str, str], endpoint: str | None
) -> None:
    assert traces_endpoint(environ) == endpoint


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ],
)
def test_settings_the_gateway_cannot_honour_are_refused_by_name(
    extra: dict[str, str], named: str
) -> None:
    with pytest.raises(TracingConfigError, match=named):
        traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", **extra})


def test_serve_refuses_to_start_on_a_bad_otel_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "sometimes")
    assert main(["serve", "--config", str(REPO / "models.yaml")]) == 2
    assert "OTEL_TRACES_SAMPLER=sometimes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (CALLER, True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),
        ("garbage", False),
    ],
)
def test_only_a_valid_traceparent_is_passed_on(value: str, valid: bool) -> None:
    assert valid_traceparent(value) is valid
    assert forwarded({"traceparent": value}) == ({"traceparent": value} if valid else None)


def test_an_oversized_tracestate_is_not_passed_on() -> None:
    assert forwarded({"traceparent": CALLER, "tracestate": "a=" + "b" * 600}) == {
        "traceparent": CALLER
    }


# Imports of the OpenTelemetry SDK, its exporter and protos fail, as in an install without the
# `tracing` extra (the API package stays: FastAPI itself depends on it).
_WITHOUT_SDK = textwrap.dedent(
    """
    import asyncio, importlib.abc, json, os, sys

    EXTRA = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto")

    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith(EXTRA):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())

    import httpx
    from prometheus_client import CollectorRegistry

    from duoserve.app import create_app
    from duoserve.config import parse_config
    from duoserve.settings import Settings
    from duoserve.tracing import TracingConfigError, check_tracing
    from tests.conftest import DIGITS_IO, v2_body
    from tests.recording_backend import RecordingBackend

    import numpy as np

    async def serve(log_format):
        backend = RecordingBackend()
        config = parse_config({
            "backends": {"ts": {"kind": "torchserve", "url": backend.url,
                                "binary_tensors": False}},
            "models": {"digits": {**DIGITS_IO, "routes": [
                {"backend": "ts", "framework": "pytorch", "model": "digits"}]}},
        })
        app = create_app(Settings(config="models.yaml", log_format=log_format), config=config,
                         registry=CollectorRegistry())
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://g") as client:
                    answer = await client.post(
                        "/v2/models/digits/infer",
                        json=v2_body(np.zeros((1, 8, 8), dtype=np.float32)),
                        headers={"traceparent": sys.argv[1]},
                    )
            return answer.status_code, backend.traceparents()
        finally:
            backend.close()

    out = {"text": asyncio.run(serve("text")), "json": asyncio.run(serve("json"))}
    try:
        check_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
        out["check"] = "passed"
    except TracingConfigError as error:
        out["check"] = str(error)
    out["loaded"] = sorted(m for m in sys.modules if m.startswith(EXTRA))
    print(json.dumps(out))
    """
)


def test_the_gateway_serves_without_the_tracing_extra() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_SDK, CALLER],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    # Tracing off: served, the caller's trace context passed on unchanged (JSON logs too).
    assert out["text"] == [200, [CALLER]]
    assert out["json"] == [200, [CALLER]]
    assert out["loaded"] == []
    # Turning tracing on without the extra is refused at start, saying what to install.
    assert "pip install 'duoserve[tracing]'" in out["check"]
