"""Fixtures of the resilience tests: a slow-able TF Serving stand-in, config files, and a
gateway subprocess over a real socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DIGITS_IO, STORE
from tests.servers import Gateway
from tests.tfserving_standin.fixture import StandinHandle, start_standin


@pytest.fixture(scope="module")
def standin(model_store: Path) -> Iterator[StandinHandle]:
    """The TF Serving stand-in serving the real digits SavedModel; tests set its delay."""
    handle = start_standin(model_store / "tensorflow" / "digits")
    try:
        yield handle
    finally:
        handle.stop()


def digits(routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {**DIGITS_IO, "routes": routes, **extra}


def local_backend(**extra: Any) -> dict[str, Any]:
    return {"kind": "embedded", "model_store": str(STORE), **extra}


def tfs_backend(handle: StandinHandle, **extra: Any) -> dict[str, Any]:
    return {"kind": "tfserving", "grpc": handle.grpc_address, "url": handle.rest_url, **extra}


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def start_gateway(tmp_path: Path, config: dict[str, Any], **env: str) -> Gateway:
    """`duoserve serve` on a free port, ready; the caller stops it in a `finally` (one that
    never got ready was stopped already by Gateway.start)."""
    server = Gateway(write_config(tmp_path / "models.yaml", config), tmp_path, env)
    server.start(120)
    return server
