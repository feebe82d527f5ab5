"""The gateway's own dispatch of inference POSTs (app.Dispatch): it must answer exactly as the
FastAPI routes it bypasses, and turn an unexpected failure into the protocol's 500 body."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import APIRouter

from duoserve.app import Dispatch
from duoserve.frontends import tfserving, torchserve, v2
from duoserve.frontends.http import fast_path
from tests.conftest import GatewayFactory, v2_body

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

ROUTERS = [v2.router, tfserving.router, torchserve.router]


def _requests(images: np.ndarray) -> list[tuple[str, Any]]:
    rows = images.tolist()
    return [
        ("/v2/models/digits-pytorch/infer", v2_body(images)),
        ("/v2/models/digits-tensorflow/versions/1/infer", v2_body(images)),
        ("/v1/models/digits-tensorflow:predict", {"instances": rows}),
        ("/v1/models/digits-pytorch/versions/1:predict", {"inputs": rows}),
        ("/v1/models/digits-pytorch/labels/stable:predict", {"instances": rows}),
        ("/predictions/digits-pytorch", rows),
        ("/predictions/digits-tensorflow/1", {"pixels": rows}),
        # bad requests: the same 4xx and body either way
        ("/v2/models/nope/infer", v2_body(images)),
        ("/v2/models/digits-pytorch/infer", {"inputs": [{"name": "pixels"}]}),
        ("/v1/models/digits-pytorch/versions/x:predict", {"instances": rows}),
        ("/predictions/digits-pytorch", {"wrong": rows}),
        ("/predictions/digits-pytorch", "not a tensor"),
    ]


async def test_fast_path_answers_exactly_as_fastapi(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images = digits_samples[0][:3]
    async with gateway() as (client, app):
        # The same app without DuoServe's chain: every request through FastAPI's router.
        plain = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app.fastapi), base_url="http://gateway"
        )
        async with plain:
            for path, body in _requests(images):
                headers = {"x-request-id": "same-id"}
                fast = await client.post(path, json=body, headers=headers)
                slow = await plain.post(path, json=body, headers=headers)
                assert fast.status_code == slow.status_code, (path, fast.text, slow.text)
                assert fast.content == slow.content, path
                for name in ("content-type", "x-request-id", "x-duoserve-framework"):
                    assert fast.headers.get(name) == slow.headers.get(name), (path, name)


def test_only_marked_inference_routes_take_the_fast_path(gateway: GatewayFactory) -> None:
    from duoserve.app import DuoServeApp

    dispatch = Dispatch(DuoServeApp(), ROUTERS)
    fast = {
        "/v2/models/m/infer": {"model": "m"},
        "/v2/models/m/versions/3/infer": {"model": "m", "version": "3"},
        "/v1/models/m:predict": {"model": "m"},
        "/v1/models/m/versions/3:predict": {"model": "m", "version": "3"},
        "/v1/models/m/labels/canary:predict": {"model": "m", "label": "canary"},
        "/predictions/m": {"model": "m"},
        "/predictions/m/2": {"model": "m", "version": "2"},
    }
    for path, params in fast.items():
        found = dispatch.match(path)
        assert found is not None, path
        assert found[1] == params, path
    for path in (
        "/v2/models/m/compare",  # not marked: FastAPI serves it
        "/v1/models/m:classify",
        "/v2/models/m/infer/extra",
        "/predictions/m/2/3",
        "/v2/models//infer",
        "/metrics",
    ):
        assert dispatch.match(path) is None, path


def test_a_fast_endpoint_with_a_typed_parameter_is_refused() -> None:
    from duoserve.app import DuoServeApp

    router = APIRouter()

    @router.post("/things/{n:int}/infer")
    @fast_path
    async def typed(request: Any, n: int) -> Any:  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(ValueError, match="plain strings"):
        Dispatch(DuoServeApp(), [router])


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/v2/models/digits-pytorch/infer", "v2", {"error"}),
        ("/predictions/digits-pytorch", "rows", {"code", "type", "message"}),
    ],
)
async def test_an_unexpected_failure_is_a_500_in_the_protocols_shape(
    gateway: GatewayFactory,
    digits_samples: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: str,
    shape: set[str],
) -> None:
    images = digits_samples[0][:2]
    payload: Any = v2_body(images) if body == "v2" else images.tolist()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    async with gateway() as (client, _):
        with monkeypatch.context() as patch:
            patch.setattr("duoserve.frontends.http.call_context", broken)
            failed = await client.post(path, json=payload)
        assert failed.status_code == 500
        assert failed.headers["content-type"] == "application/json"
        assert set(failed.json()) == shape
        assert "internal error" in failed.text
        assert "a bug" not in failed.text  # no internals leak
        again = await client.post(path, json=payload)
        assert again.status_code == 200, again.text
