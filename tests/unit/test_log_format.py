"""The JSON log format (duoserve.logs): what one line holds, inside and outside a request."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from duoserve.logs import CURRENT, JSONFormatter, LogContext


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    log = logging.getLogger("duoserve.test_logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield log, out
    finally:
        log.removeHandler(handler)


def entries(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_line_outside_a_request_has_no_request_ids(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    log.warning("backend %s is %s", "ts", "down")
    [entry] = entries(out)
    assert set(entry) == {"time", "level", "logger", "message"}
    assert entry["message"] == "backend ts is down"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "duoserve.test_logs"
    assert str(entry["time"]).endswith("Z")


def test_a_line_inside_a_request_carries_its_ids(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    token = CURRENT.set(
        LogContext("req-1", "digits", "pytorch", "ts", "4bf92f3577b34da6a3ce929d0e0e4736")
    )
    try:
        log.info("answered")
    finally:
        CURRENT.reset(token)
    log.info("after")
    inside, after = entries(out)
    assert inside["request_id"] == "req-1"
    assert inside["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert (inside["model"], inside["framework"], inside["backend"]) == (
        "digits",
        "pytorch",
        "ts",
    )
    assert "span_id" not in inside  # unknown: left out, not null
    assert "request_id" not in after


def test_an_exception_is_one_line_with_its_traceback(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("backend failed unexpectedly")
    assert len(out.getvalue().splitlines()) == 1
    [entry] = entries(out)
    assert "RuntimeError: boom" in str(entry["exception"])
