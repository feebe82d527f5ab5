"""The route table (duoserve.routes), in-process: it picks the route FastAPI picks, and below a
root path every front door keeps its meaning: API keys and their per-model grants, compare for
admins only, readiness 503 while draining, each front door's error shape, the OpenAPI page.

Three deployments below ``/ml``: DUOSERVE_ROOT_PATH behind a proxy that forwards the prefix,
the same behind one that strips it, and a root path the ASGI server passes (what
``uvicorn --root-path /ml`` does: ``scope["root_path"]`` is /ml and the path includes it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from duoserve.app import create_app
from duoserve.auth import hash_key
from duoserve.settings import Settings
from tests.conftest import REPO, GatewayFactory, v2_body

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
    # FastAPI gives a GET+HEAD route one operationId for both methods (/v2/health/*, /ping);
    # so it was before the route table. Building the schema warns; it is served all the same.
    pytest.mark.filterwarnings("ignore:Duplicate Operation ID:UserWarning"),
]

ROOT = "/ml"
IMAGE = (np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)
ROWS = IMAGE.tolist()
ADMIN, APP = "dsk_admin-key", "dsk_app-key"
TS_SHAPE, ERROR_SHAPE = {"code", "type", "message"}, {"error"}

# (name, DUOSERVE_ROOT_PATH, the server's root_path, what the client puts before each path)
DEPLOYMENTS = [
    ("forwarding-proxy", ROOT, "", ROOT),
    ("stripping-proxy", ROOT, "", ""),
    ("server-root-path", "", ROOT, ROOT),
]


def write_keys(path: Path) -> str:
    path.write_text(
        yaml.safe_dump(
            [
                {"name": "ops", "sha256": hash_key(ADMIN), "scopes": ["admin"]},
                {"name": "app", "sha256": hash_key(APP), "models": ["digits"]},
            ]
        )
    )
    return str(path)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


Below = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture(params=DEPLOYMENTS, ids=[d[0] for d in DEPLOYMENTS])
def below_root(request: pytest.FixtureRequest, gateway: GatewayFactory) -> Callable[..., Any]:
    """``async with below_root(**settings) as (call, app)``: ``call(method, path, **kw)`` sends
    ``path`` (as seen below the root path) the way this deployment's client reaches it."""
    _, setting, server_root, prefix = request.param

    @asynccontextmanager
    async def make(**settings: Any) -> AsyncIterator[tuple[Below, Any]]:
        if setting:
            settings["root_path"] = setting
        async with gateway(**settings) as (_, app):
            transport = httpx.ASGITransport(app=app, root_path=server_root)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:

                async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
                    return await client.request(method, prefix + path, **kwargs)

                yield call, app

    return make


async def test_keys_below_the_root_path(below_root: Any, tmp_path: Path) -> None:
    body = v2_body(IMAGE)
    async with below_root(api_keys_file=write_keys(tmp_path / "keys.yaml")) as (call, _):
        none = await call("POST", "/v2/models/digits/infer", json=body)
        assert none.status_code == 401 and set(none.json()) == ERROR_SHAPE
        ts_none = await call("POST", "/predictions/digits", json=ROWS)
        assert ts_none.status_code == 401 and ts_none.json()["code"] == 401
        assert set(ts_none.json()) == TS_SHAPE

        ok = await call("POST", "/v2/models/digits/infer", json=body, headers=bearer(APP))
        assert ok.status_code == 200, ok.text
        # A key for `digits` may not call another model, on any front door, not even its
        # metadata; refusals come in each front door's shape.
        for method, path, payload, shape in [
            ("POST", "/v2/models/digits-tensorflow/infer", body, ERROR_SHAPE),
            ("POST", "/v2/models/digits-tensorflow/versions/1/infer", body, ERROR_SHAPE),
            ("GET", "/v2/models/digits-tensorflow", None, ERROR_SHAPE),
            ("POST", "/v1/models/digits-tensorflow:predict", {"instances": ROWS}, ERROR_SHAPE),
            ("GET", "/v1/models/digits-tensorflow/metadata", None, ERROR_SHAPE),
            ("GET", "/v1/models/digits-tensorflow", None, ERROR_SHAPE),
            ("POST", "/predictions/digits-tensorflow", ROWS, TS_SHAPE),
            ("POST", "/predictions/digits-tensorflow/1", ROWS, TS_SHAPE),
        ]:
            denied = await call(method, path, json=payload, headers=bearer(APP))
            assert denied.status_code == 403, (path, denied.text)
            assert set(denied.json()) == shape, path
            assert "may not use model 'digits-tensorflow'" in denied.text, path
        # TF Serving's `{model}:predict`: the model is what the route serves, so a path that
        # starts like a granted model's name is still another model.
        trick = await call(
            "POST",
            "/v1/models/digits:predict:predict",
            json={"instances": ROWS},
            headers=bearer(APP),
        )
        assert trick.status_code == 403, trick.text

        # compare needs the admin scope below the root path too.
        compare = await call("POST", "/v2/models/digits/compare", json=body, headers=bearer(APP))
        assert compare.status_code == 403 and "admin" in compare.json()["error"]
        compare = await call("POST", "/v2/models/digits/compare", json=body, headers=bearer(ADMIN))
        assert compare.status_code == 200, compare.text
        assert {r["framework"] for r in compare.json()["results"]} == {"pytorch", "tensorflow"}

        # Health and metrics stay open for probes and scrapers; anything else needs a key.
        for path in ("/v2/health/ready", "/v2/health/live", "/ping", "/metrics"):
            assert (await call("GET", path)).status_code == 200, path
        assert (await call("GET", "/v2/models")).status_code == 401
        assert (await call("GET", "/openapi.json")).status_code == 401
        assert (await call("GET", "/v2/models", headers=bearer(APP))).status_code == 200


async def test_every_front_door_below_the_root_path(below_root: Any) -> None:
    body = v2_body(IMAGE)
    async with below_root() as (call, _):
        for method, path, payload in [
            ("POST", "/v2/models/digits/infer", body),
            ("POST", "/v2/models/digits/versions/1/infer", body),
            ("POST", "/v2/models/digits/compare", body),
            ("GET", "/v2/models/digits", None),
            ("GET", "/v2/models/digits/ready", None),
            ("GET", "/v2/health/ready", None),
            ("POST", "/v1/models/digits:predict", {"instances": ROWS}),
            ("POST", "/v1/models/digits/versions/1:predict", {"instances": ROWS}),
            ("GET", "/v1/models/digits", None),
            ("GET", "/v1/models/digits/metadata", None),
            ("POST", "/predictions/digits", ROWS),
            ("POST", "/predictions/digits/1", ROWS),
            ("GET", "/ping", None),
        ]:
            answer = await call(method, path, json=payload)
            assert answer.status_code == 200, (path, answer.text)
        served = await call("POST", "/predictions/digits-pytorch", json=ROWS)
        assert served.headers["x-duoserve-framework"] == "pytorch"
        assert np.array(served.json()).shape == (1, 10)

        # Errors keep each front door's shape: from the endpoints, from FastAPI's router (404,
        # 405) and for paths no route matches.
        for method, path, payload, status, shape in [
            ("POST", "/v2/models/nope/infer", body, 404, ERROR_SHAPE),
            ("POST", "/v2/models/digits/infer", {"inputs": "x"}, 400, ERROR_SHAPE),
            ("GET", "/v2/models/digits/infer", None, 405, ERROR_SHAPE),
            ("GET", "/v2/nothing/here", None, 404, ERROR_SHAPE),
            ("POST", "/v1/models/nope:predict", {"instances": ROWS}, 404, ERROR_SHAPE),
            ("POST", "/v1/models/digits:classify", {}, 400, ERROR_SHAPE),
            ("POST", "/predictions/nope", ROWS, 404, TS_SHAPE),
            ("POST", "/predictions/digits", {"wrong": ROWS}, 400, TS_SHAPE),
            ("GET", "/predictions/digits", None, 405, TS_SHAPE),
            ("POST", "/predictions/digits/1/extra", ROWS, 404, TS_SHAPE),
        ]:
            answer = await call(method, path, json=payload)
            assert answer.status_code == status, (path, answer.text)
            assert set(answer.json()) == shape, (path, answer.text)


async def test_readiness_is_503_while_draining_below_the_root_path(below_root: Any) -> None:
    async with below_root() as (call, app):
        assert (await call("GET", "/v2/health/ready")).status_code == 200
        assert (await call("GET", "/ping")).status_code == 200
        app.state.drain.begin()
        ready = await call("GET", "/v2/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "draining": True}
        assert ready.headers["connection"] == "close"
        ping = await call("GET", "/ping")
        assert ping.status_code == 503
        assert ping.json() == {"status": "Unhealthy", "draining": True}
        # Still alive, and still serving, each answer closing its connection.
        assert (await call("GET", "/v2/health/live")).status_code == 200
        served = await call("POST", "/v2/models/digits/infer", json=v2_body(IMAGE))
        assert served.status_code == 200 and served.headers["connection"] == "close"


async def test_openapi_page_and_schema_below_the_root_path(below_root: Any) -> None:
    async with below_root() as (call, _):
        schema = await call("GET", "/openapi.json")
        assert schema.status_code == 200
        assert schema.json()["servers"] == [{"url": ROOT}]
        assert "/v2/models/{model}/infer" in schema.json()["paths"]
        assert "/predictions/{model}" in schema.json()["paths"]
        page = await call("GET", "/docs")
        assert page.status_code == 200
        assert f"'{ROOT}/openapi.json'" in page.text


async def test_without_a_root_path_nothing_is_below_one(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        schema = (await client.get("/openapi.json")).json()
        assert "servers" not in schema
        assert (await client.post("/ml/predictions/digits", json=ROWS)).status_code == 404


# -- the table against FastAPI's router ----------------------------------------------------------


def _paths(app: Any) -> list[str]:
    """A path for every route (parameters filled in), and paths that match none or several."""
    paths = [
        "/v1/models/m:predict:predict",
        "/v2/models//infer",
        "/v2/models/m/infer/extra",
        "/predictions/m/1/extra",
        "/v2/",
        "/v2/nothing",
        "/",
        "/models/m",
        "/ml/v2/models/m/infer",
    ]
    for route in app.state.gateway.routes.routes:
        path = route.path
        for name in route.param_convertors:
            path = path.replace("{" + name + "}", "m" if name == "model" else "1")
        paths.append(path)
    return paths


async def _fastapi_serves(app: Any, method: str, path: str) -> tuple[int, Any]:
    """Status and endpoint of ``method path`` through FastAPI's router (no DuoServe chain)."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "state": {},
    }
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app.fastapi(scope, receive, send)
    status: int = messages[0]["status"]
    return status, scope.get("endpoint") if status != 307 else None  # 307: a slash redirect


async def test_the_table_picks_the_route_fastapi_picks(gateway: GatewayFactory) -> None:
    """For every method and path, the route the table matched (and read by keys, drain and
    errors) is the one FastAPI's own router serves the request with; none for a 404."""
    async with gateway() as (_, app):
        routes = app.state.gateway.routes
        checked = 0
        for path in _paths(app):
            for method in ("GET", "POST", "HEAD", "DELETE"):
                status, served = await _fastapi_serves(app, method, path)
                found = routes.match(method, path)
                endpoint = found.route.endpoint if found.route is not None else None
                assert endpoint is served, (method, path, found.route, served)
                if found.route is None:
                    assert status in (404, 307), (method, path, status)
                elif found.route.methods and method not in found.route.methods:
                    assert status == 405, (method, path, status)
                checked += 1
        assert checked > 100


def test_a_root_path_must_be_a_path_and_not_hide_the_gateways_own() -> None:
    assert Settings(root_path="/ml/").root_path == "/ml"
    assert Settings(root_path="/").root_path == ""
    assert Settings(root_path="/team/ml").root_path == "/team/ml"
    for bad in ("ml", "/ml?x=1", "/a b", "/ml//x", "/caf\u00e9", "/ml%2f"):
        with pytest.raises(ValidationError, match="root_path"):
            Settings(root_path=bad)
    for hidden in ("/v2", "/predictions", "/ping", "/metrics", "/docs", "/v1/models"):
        with pytest.raises(ValueError, match=f"/{hidden.split('/')[1]} is one of the gateway's"):
            create_app(Settings(config=str(REPO / "models.yaml"), root_path=hidden))
