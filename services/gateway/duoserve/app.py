"""create_app(settings): wires frontends, data plane, backends and metrics. Nothing heavy
happens at import time; models load when the app starts (lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from duoserve import __version__
from duoserve.backends.base import Backend
from duoserve.config import GatewayConfig, load_config
from duoserve.dataplane import DataPlane
from duoserve.errors import DuoServeError
from duoserve.frontends import tfserving, torchserve, v2
from duoserve.frontends.http import JSON, Gateway, error_json, torchserve_error_json
from duoserve.metrics import Metrics
from duoserve.settings import Settings

log = logging.getLogger(__name__)

TORCHSERVE_PATHS = ("/predictions", "/ping")


def build_backends(config: GatewayConfig, base_dir: Path) -> dict[str, Backend]:
    """One Backend per entry of ``backends``; modules imported only for the kinds used."""
    backends: dict[str, Backend] = {}
    for name, backend_config in config.backends.items():
        if backend_config.kind == "embedded":
            from duoserve.backends.embedded import EmbeddedBackend

            embedded = EmbeddedBackend(name, backend_config, base_dir)
            backends[name] = embedded
        elif backend_config.kind == "torchserve":
            from duoserve.backends.torchserve import TorchServeBackend

            backends[name] = TorchServeBackend(name, backend_config)
        elif backend_config.kind == "tfserving":
            from duoserve.backends.tfserving import TFServingBackend

            backends[name] = TFServingBackend(name, backend_config)
        else:
            from duoserve.backends.v2 import V2Backend

            backends[name] = V2Backend(name, backend_config)
    # Embedded runtimes load only what routes point at, with the declared signatures.
    for model_name, model in config.models.items():
        routes = list(model.routes) + ([model.shadow] if model.shadow else [])
        for route in routes:
            backend = backends[route.backend]
            register = getattr(backend, "register", None)
            if register is not None:
                register(route.framework, route.model or model_name, model.inputs, model.outputs)
    return backends


async def _probe_backends(dataplane: DataPlane, metrics: Metrics, interval_s: float) -> None:
    """Keep duoserve_backend_up current: 1 when the backend can serve all its routes."""
    while True:
        status: dict[tuple[str, str], bool] = {}
        for model in dataplane.models.values():
            for route in model.routes + ([model.shadow] if model.shadow else []):
                key = (route.backend_name, route.framework)
                try:
                    ok = await asyncio.wait_for(
                        route.backend.ready(route.model, route.version, framework=route.framework),
                        timeout=max(1.0, interval_s),
                    )
                except Exception:  # noqa: BLE001 - a probe failure is a 0, not a crash
                    ok = False
                status[key] = status.get(key, True) and ok
        for (backend, framework), ok in status.items():
            metrics.backend_up.labels(backend, framework).set(1 if ok else 0)
        await asyncio.sleep(interval_s)


def _error_response(request: Request, error: DuoServeError) -> Response:
    render = torchserve_error_json if request.url.path.startswith(TORCHSERVE_PATHS) else error_json
    return Response(render(error), status_code=error.status, headers=error.headers, media_type=JSON)


def create_app(
    settings: Settings | None = None,
    *,
    config: GatewayConfig | None = None,
    registry: CollectorRegistry | None = None,
    backends: dict[str, Backend] | None = None,
) -> FastAPI:
    """Build the gateway. Tests pass their own config, registry and (optionally) backends."""
    settings = settings or Settings()
    config_path = Path(settings.config)
    if config is None:
        config = load_config(config_path)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    if backends is None:
        backends = build_backends(config, config_path.resolve().parent)
    dataplane = DataPlane(config, backends, metrics, settings.default_timeout_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.gather(*(backend.start() for backend in backends.values()))
        probe = asyncio.get_running_loop().create_task(
            _probe_backends(dataplane, metrics, settings.backend_probe_interval_s)
        )
        try:
            yield
        finally:
            probe.cancel()
            await dataplane.wait_shadows()
            await asyncio.gather(
                *(backend.close() for backend in backends.values()), return_exceptions=True
            )

    app = FastAPI(
        title="DuoServe",
        version=__version__,
        description="One REST front door for PyTorch and TensorFlow models.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.gateway = Gateway(dataplane, metrics, settings.max_body_bytes)

    @app.exception_handler(DuoServeError)
    async def on_duoserve_error(request: Request, error: DuoServeError) -> Response:
        return _error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        detail = error.detail if isinstance(error.detail, str) else "request failed"
        if error.status_code == 404:
            detail = f"no such endpoint: {request.method} {request.url.path[:200]}"
        wrapped = DuoServeError(detail, headers=dict(error.headers or {}))
        wrapped.status = error.status_code
        return _error_response(request, wrapped)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        wrapped = DuoServeError(f"invalid request: {where}: {first.get('msg', 'invalid')}")
        wrapped.status = 400
        return _error_response(request, wrapped)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        wrapped = DuoServeError("internal error; the gateway logged the details")
        return _error_response(request, wrapped)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept"))
        return Response(encoder(registry), headers={"content-type": content_type})

    app.include_router(v2.router)
    app.include_router(tfserving.router)
    app.include_router(torchserve.router)
    return app
