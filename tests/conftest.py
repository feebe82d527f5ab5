"""Shared fixtures: the built model store, in-process gateways, and real servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from duoserve.app import create_app
from duoserve.config import GatewayConfig, parse_config
from duoserve.settings import Settings
from tests.servers import REPO, TorchServe

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STORE = REPO / "models" / "store"
DIGITS_IO = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}


@pytest.fixture(scope="session")
def model_store() -> Path:
    """models/store with the digits twins and their perturbed variant, built (incrementally)
    if needed."""
    from models.build import build

    build(STORE, ["digits", "digits-perturbed"])
    return STORE


@pytest.fixture(scope="session")
def digits_samples() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits images [n, 8, 8] (0..16) and labels, as the model builder splits them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32)
    _, x_test, _, y_test = train_test_split(
        images, data.target, test_size=0.25, random_state=0, stratify=data.target
    )
    return x_test, y_test


def v2_body(images: np.ndarray, **extra: Any) -> dict[str, Any]:
    """A V2 infer request for a batch of digits images."""
    return {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(images.shape),
                "datatype": "FP32",
                "data": images.ravel().tolist(),
            }
        ],
        **extra,
    }


def digits_model(routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {**DIGITS_IO, "routes": routes, **extra}


def embedded_config(**models: dict[str, Any]) -> dict[str, Any]:
    """A config over the embedded backend; default models like `make run`'s."""
    if not models:
        models = {
            "digits": digits_model(
                [
                    {"backend": "local", "framework": "pytorch", "model": "digits", "weight": 1},
                    {"backend": "local", "framework": "tensorflow", "model": "digits", "weight": 1},
                ],
                failover=True,
            ),
            "digits-pytorch": digits_model(
                [{"backend": "local", "framework": "pytorch", "model": "digits"}]
            ),
            "digits-tensorflow": digits_model(
                [{"backend": "local", "framework": "tensorflow", "model": "digits"}]
            ),
        }
    return {
        "backends": {"local": {"kind": "embedded", "model_store": str(STORE)}},
        "models": models,
    }


GatewayFactory = Callable[..., Any]


@pytest.fixture
def gateway(model_store: Path) -> GatewayFactory:
    """Build an in-process gateway: ``async with gateway(config_dict) as (client, app):``."""

    @asynccontextmanager
    async def make(
        config: dict[str, Any] | GatewayConfig | None = None, **settings: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
        parsed = (
            config
            if isinstance(config, GatewayConfig)
            else parse_config(config or embedded_config())
        )
        app = create_app(
            Settings(config=str(REPO / "models.yaml"), **settings),
            config=parsed,
            registry=CollectorRegistry(),
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                yield client, app

    return make


@pytest.fixture(scope="session")
def torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """A real TorchServe (token auth on) serving digits.mar on 127.0.0.1."""
    server = TorchServe(
        tmp_path_factory.mktemp("torchserve"), model_store / "torchserve", {"digits": {}}
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tfserving(model_store: Path) -> Iterator[Any]:
    """The TF Serving stand-in (REST + gRPC, official protos) serving the digits SavedModel."""
    from tests.tfserving_standin.fixture import start_standin

    handle = start_standin(model_base_path=model_store / "tensorflow" / "digits")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def v2_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Open Inference Protocol server on a socket: a DuoServe gateway with `make run`'s
    models.yaml (MLServer and Triton: tests/integration/test_v2_backend.py)."""
    from tests.servers import Gateway

    server = Gateway(REPO / "models.yaml", tmp_path_factory.mktemp("v2-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pytorch_gateway(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A gateway on a real socket serving `digits` on the embedded PyTorch runtime only
    (quick to start: TensorFlow is never imported)."""
    import yaml

    from tests.servers import Gateway

    workdir = tmp_path_factory.mktemp("pytorch-gateway")
    config = workdir / "models.yaml"
    routes = [{"backend": "local", "framework": "pytorch"}]
    config.write_text(
        yaml.safe_dump(
            {
                "backends": {"local": {"kind": "embedded", "model_store": str(model_store)}},
                "models": {"digits": {**DIGITS_IO, "routes": routes}},
            }
        )
    )
    server = Gateway(config, workdir, env={"DUOSERVE_LOG_LEVEL": "warning"})
    try:
        server.start()
        yield server
    finally:
        server.stop()
