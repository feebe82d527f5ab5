"""JSON logs, as an operator reads them: ``duoserve serve`` with ``DUOSERVE_LOG_FORMAT=json`` and
the access log on writes one JSON object per line to stderr, each line of a request carrying
that request's ids, and never its payload or the backend's token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DIGITS_IO
from tests.recording_backend import RecordingBackend
from tests.servers import Gateway, wait_until

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
TOKEN = "sekrit-token-5f1b7a"
MARKER = 4242.4375
"""A pixel value found nowhere but in the payload."""


@pytest.fixture(scope="module")
def json_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Any]]:
    workdir = tmp_path_factory.mktemp("json-logs")
    backend = RecordingBackend()
    route = {"backend": "ts", "framework": "pytorch"}
    config = {
        "backends": {
            "ts": {
                "kind": "torchserve",
                "url": backend.url,
                "binary_tensors": False,
                "token_env": "DUOSERVE_TEST_TS_TOKEN",
            }
        },
        "models": {
            "digits": {**DIGITS_IO, "routes": [{**route, "model": "digits"}]},
            "digits-broken": {**DIGITS_IO, "routes": [{**route, "model": "broken"}]},
        },
    }
    path = workdir / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = Gateway(
        path,
        workdir,
        {
            "DUOSERVE_LOG_FORMAT": "json",
            "DUOSERVE_ACCESS_LOG": "true",
            "DUOSERVE_TEST_TS_TOKEN": TOKEN,
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",  # tracing off: the caller's ids are logged
        },
    )
    try:
        gateway.start()
        yield gateway, backend
    finally:
        gateway.stop()
        backend.close()


def post(url: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def body() -> dict[str, Any]:
    data = [float(i % 17) for i in range(64)]
    data[5] = MARKER
    return {"inputs": [{"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32", "data": data}]}


def lines(log: Path) -> list[dict[str, Any]]:
    """Every line of the gateway's output, each parsed as JSON (one that is not fails)."""
    out = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), line
        out.append(entry)
    return out


def of_request(log: Path, request_id: str, count: int) -> list[dict[str, Any]]:
    """The ``count`` lines logged for ``request_id``, once they are all written."""
    found: list[dict[str, Any]] = []

    def written() -> bool:
        found[:] = [e for e in lines(log) if e.get("request_id") == request_id]
        return len(found) >= count

    wait_until(written, 15, f"{count} log lines of {request_id}")
    return found


def test_every_line_is_json_and_a_request_s_lines_carry_its_ids(
    json_gateway: tuple[Gateway, RecordingBackend],
) -> None:
    gateway, backend = json_gateway
    url = f"{gateway.url}/v2/models/digits/infer"
    status, _ = post(url, body(), {"x-request-id": "req-json-1", "traceparent": TRACEPARENT})
    assert status == 200

    [access] = of_request(gateway.log, "req-json-1", 1)
    assert access["logger"] == "duoserve.access"
    assert access["level"] == "INFO"
    assert access["time"].endswith("Z")
    assert access["method"] == "POST"
    assert access["path"] == "/v2/models/digits/infer"
    assert access["status"] == 200
    assert access["duration_ms"] > 0
    assert access["trace_id"] == TRACE
    assert access["model"] == "digits"
    assert (access["framework"], access["backend"]) == ("pytorch", "ts")
    # The backend got the token; the log never has it, nor the payload.
    [(_, headers)] = [r for r in backend.received if r[1].get("traceparent") == TRACEPARENT]
    assert headers["authorization"] == f"Bearer {TOKEN}"
    text = gateway.log.read_text()
    assert TOKEN not in text
    assert str(MARKER) not in text
    # Lines before any request (uvicorn's start-up) are JSON too, without request ids.
    assert any(
        e["logger"].startswith("uvicorn") and "request_id" not in e for e in lines(gateway.log)
    )


def test_a_warning_logged_while_serving_carries_the_request_s_ids(
    json_gateway: tuple[Gateway, RecordingBackend],
) -> None:
    gateway, _ = json_gateway
    url = f"{gateway.url}/v2/models/digits-broken/infer"
    status, answer = post(url, body(), {"x-request-id": "req-json-2", "traceparent": TRACEPARENT})
    assert status == 502
    assert "error" in answer

    entries = of_request(gateway.log, "req-json-2", 2)
    [warning] = [e for e in entries if e["level"] == "WARNING"]
    assert warning["logger"] == "duoserve.backends.torchserve"
    assert "unexpected TorchServe answer" in warning["message"]
    assert warning["trace_id"] == TRACE
    assert (warning["model"], warning["framework"], warning["backend"]) == (
        "digits-broken",
        "pytorch",
        "ts",
    )
    [access] = [e for e in entries if e["logger"] == "duoserve.access"]
    assert access["status"] == 502
    assert str(MARKER) not in gateway.log.read_text()


def test_a_refused_request_is_logged_with_the_id_it_was_answered_with(
    json_gateway: tuple[Gateway, RecordingBackend],
) -> None:
    gateway, _ = json_gateway
    status, answer = post(
        f"{gateway.url}/v2/models/nope/infer", body(), {"x-request-id": "req-json-3"}
    )
    assert status == 404
    assert "error" in answer
    [access] = of_request(gateway.log, "req-json-3", 1)
    assert access["status"] == 404
    assert access["path"] == "/v2/models/nope/infer"
