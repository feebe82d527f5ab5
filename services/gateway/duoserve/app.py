"""create_app(settings): wires frontends, data plane, backends and metrics. Nothing heavy
happens at import time; models load when the app starts (lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRouter
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from duoserve import __version__
from duoserve.auth import APIKeyMiddleware, ASGIApp, KeyRing, Receive, Scope, Send
from duoserve.backends.base import Backend
from duoserve.config import GatewayConfig, load_config
from duoserve.connections import GUARD_STATE_KEY, ConnectionGuard
from duoserve.dataplane import DataPlane, register_routes
from duoserve.drain import Drain, DrainMiddleware, chain_uvicorn_signals
from duoserve.errors import DuoServeError
from duoserve.frontends import tfserving, torchserve, v2
from duoserve.frontends.http import JSON, Gateway, error_json, gateway_of
from duoserve.logs import AccessLog
from duoserve.metrics import Metrics
from duoserve.reloader import ConfigReloader
from duoserve.resilience import CancelOnDisconnect, RetryBudget
from duoserve.routes import FrontDoor, Handler, Kind, RouteTable
from duoserve.settings import Settings
from duoserve.tracing import tracing_from_env

log = logging.getLogger(__name__)

door = FrontDoor("DuoServe", errors=error_json)
"""The gateway's own routes, in front of the protocols' front doors."""


@door.get("/metrics", Kind.METRICS, include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(
        encoder(gateway_of(request).metrics.registry), headers={"content-type": content_type}
    )


FRONT_DOORS = (door, v2.door, tfserving.door, torchserve.door)
"""Included in this order, which is also FastAPI's matching order."""


@functools.cache
def front_door_routes() -> RouteTable:
    """The front doors' routes, without an app (for callers holding only a path)."""
    return RouteTable((r for d in FRONT_DOORS for r in d.router.routes), errors=error_json)


def build_backends(
    config: GatewayConfig,
    base_dir: Path,
    metrics: Metrics | None = None,
    only: set[str] | None = None,
) -> dict[str, Backend]:
    """One Backend per entry of ``backends`` (or of those named in ``only``), each told the
    models its routes point at; modules imported only for the kinds used. ``metrics``
    receives the remote backends' per-replica series."""
    backends: dict[str, Backend] = {}
    for name, backend_config in config.backends.items():
        if only is not None and name not in only:
            continue
        if backend_config.kind == "embedded":
            from duoserve.backends.embedded import EmbeddedBackend

            embedded = EmbeddedBackend(name, backend_config, base_dir)
            backends[name] = embedded
        elif backend_config.kind == "torchserve":
            from duoserve.backends.torchserve import TorchServeBackend

            backends[name] = TorchServeBackend(name, backend_config, metrics=metrics)
        elif backend_config.kind == "tfserving":
            from duoserve.backends.tfserving import TFServingBackend

            backends[name] = TFServingBackend(name, backend_config, metrics=metrics)
        else:
            from duoserve.backends.v2 import V2Backend

            backends[name] = V2Backend(name, backend_config, metrics=metrics)
    register_routes(config, backends)
    return backends


async def _probe_backends(dataplane: DataPlane, metrics: Metrics, interval_s: float) -> None:
    """Keep duoserve_backend_up current: 1 when the backend can serve all its routes."""
    while True:
        status: dict[tuple[str, str], bool] = {}
        for model in dataplane.models.values():
            for route in model.routes + ([model.shadow] if model.shadow else []):
                key = (route.backend_name, route.framework)
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that races
                # a finished probe, and then this loop would outlive the app's shutdown.
                try:
                    async with asyncio.timeout(max(1.0, interval_s)):
                        ok = await route.backend.ready(
                            route.model, route.version, framework=route.framework
                        )
                except Exception:  # noqa: BLE001 - a probe failure is a 0, not a crash
                    ok = False
                status[key] = status.get(key, True) and ok
        for (backend, framework), ok in status.items():
            metrics.backend_up.labels(backend, framework).set(1 if ok else 0)
        await asyncio.sleep(interval_s)


def _reload_on_hangup(
    reloader: ConfigReloader, loop: asyncio.AbstractEventLoop
) -> Callable[[], None]:
    """SIGHUP reloads models.yaml (as nginx and Prometheus do); returns how to undo it. Only
    the main thread can take signals: elsewhere (tests) the file watcher alone reloads."""
    pending: set[asyncio.Task[str]] = set()

    def hangup() -> None:
        task = loop.create_task(reloader.check(forced=True))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, hangup)
    except (RuntimeError, ValueError, NotImplementedError):
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return undo


def _error_response(routes: RouteTable, request: Request, error: DuoServeError) -> Response:
    return Response(
        routes.error_body(request.scope, error),
        status_code=error.status,
        headers=error.headers,
        media_type=JSON,
    )


class DuoServeApp(FastAPI):
    """FastAPI, entered through DuoServe's own pure ASGI chain for every HTTP request:
    API keys, drain, disconnect watching, then ``Dispatch`` (inference POSTs straight to their
    endpoint, everything else to FastAPI). Lifespan goes to FastAPI as usual."""

    entry: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.entry is not None:
            await self.entry(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI itself, without DuoServe's chain in front."""
        await super().__call__(scope, receive, send)


class Dispatch:
    """The routes declared ``fast`` (inference POSTs) run without FastAPI's router, dependency
    solving and exception middleware: same endpoint, same path parameters, same error bodies,
    at well under half the CPU per request. Anything else goes to FastAPI.

    The request's match is the route table's (``RouteTable.resolve``), made once for the whole
    chain in FastAPI's own order: a request takes the fast path only when the first route
    whose path and method match it is a fast one, so the two can never disagree about which
    endpoint serves it. ``routes`` may also be a list of routers, looked at after the app's
    own routes, in that order."""

    def __init__(self, app: DuoServeApp, routes: RouteTable | list[APIRouter]) -> None:
        self.app = app
        if not isinstance(routes, RouteTable):
            routers = routes
            routes = RouteTable(
                [*app.router.routes, *(r for router in routers for r in router.routes)],
                errors=error_json,
            )
        self.routes = routes

    def match(self, path: str) -> tuple[Handler, dict[str, str]] | None:
        """The endpoint and path parameters that serve a POST on ``path`` (below the root
        path) on the fast path; None when FastAPI serves it."""
        found = self.routes.match("POST", path)
        return None if found.endpoint is None else (found.endpoint, found.params)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.routes.resolve(scope)
        endpoint = found.endpoint
        if endpoint is None:
            await self.app.fastapi(scope, receive, send)
            return
        scope["app"] = self.app
        request = Request(scope, receive)
        try:
            response = await endpoint(request, **found.params)
        except ClientDisconnect:
            return  # the client left while sending its body: nobody reads an answer
        except DuoServeError as error:
            response = _error_response(self.routes, request, error)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"][:200])
            response = _error_response(
                self.routes,
                request,
                DuoServeError("internal error; the gateway logged the details"),
            )
        await response(scope, receive, send)


def _routed_app(
    root_path: str, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]] | None = None
) -> tuple[DuoServeApp, RouteTable]:
    """The app with every front door, and its route table (ValueError for a root path no
    request could be served below)."""
    app = DuoServeApp(
        title="DuoServe",
        version=__version__,
        description="One REST front door for PyTorch and TensorFlow models.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    for front_door in FRONT_DOORS:
        app.include_router(front_door.router)
    # What every route is, read by keys, drain, dispatch and error bodies: one match a request.
    return app, RouteTable(app.router.routes, errors=error_json, root_path=root_path)


def check_root_path(root_path: str) -> None:
    """ValueError when ``root_path`` (DUOSERVE_ROOT_PATH) would hide the gateway's own paths."""
    _routed_app(root_path)


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
    loaded: bytes | None = None  # the file's bytes when the configuration came from it
    if config is None:
        config = load_config(config_path)
        with contextlib.suppress(OSError):
            loaded = config_path.read_bytes()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    base_dir = config_path.resolve().parent
    if backends is None:
        backends = build_backends(config, base_dir, metrics)
    dataplane = DataPlane(
        config,
        backends,
        metrics,
        circuit_failure_threshold=settings.circuit_failure_threshold,
        circuit_reset_s=settings.circuit_reset_s,
        retry_budget=RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min),
    )
    # Read at build time so a bad keys file stops the gateway before it listens.
    keys = KeyRing.load(settings.api_keys_file) if settings.api_keys_file else None
    # OTEL_* (off unless an OTLP endpoint is set); JSON logs want each request's ids too.
    tracing = tracing_from_env(os.environ, metrics, logs=settings.log_format == "json")
    drain = Drain(settings.drain_delay_s)

    reloader = ConfigReloader(
        config_path,
        dataplane,
        lambda new, names: build_backends(new, base_dir, metrics, only=names),
        metrics,
        loaded=loaded,
        drain_s=settings.drain_grace_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if tracing is not None:
            tracing.start_export()
        await asyncio.gather(*(backend.start() for backend in dataplane.backends.values()))
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(
                _probe_backends(dataplane, metrics, settings.backend_probe_interval_s)
            ),
            loop.create_task(dataplane.run_rollouts()),
        ]
        if loaded is not None and settings.config_poll_s > 0:
            tasks.append(loop.create_task(reloader.run(settings.config_poll_s)))
        undo_signals = chain_uvicorn_signals(drain, loop)
        undo_hangup = _reload_on_hangup(reloader, loop)
        try:
            # The lifespan state reaches uvicorn's protocol of every connection: there the
            # guard holds slow and idle clients to their deadlines (duoserve.connections).
            yield {GUARD_STATE_KEY: guard}
        finally:
            undo_hangup()
            undo_signals()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5)
            await dataplane.wait_shadows()
            await dataplane.close_rollouts()
            await dataplane.wait_drained(timeout_s=5)
            await asyncio.gather(
                *(backend.close() for backend in dataplane.backends.values()),
                return_exceptions=True,
            )
            if tracing is not None:
                # The spans still queued, for at most 5 s: a collector that is down does not
                # hold the shutdown.
                await asyncio.to_thread(tracing.shutdown, 5.0)

    app, routes = _routed_app(settings.root_path, lifespan)
    guard = ConnectionGuard.from_settings(settings, metrics, routes.error_body)
    app.state.settings = settings
    app.state.gateway = Gateway(dataplane, metrics, settings.max_body_bytes, routes, tracing)
    app.state.drain = drain

    @app.exception_handler(ClientDisconnect)
    async def on_client_disconnect(request: Request, error: ClientDisconnect) -> Response:
        # The client left while sending its body: nobody reads this answer.
        return Response(status_code=400)

    @app.exception_handler(DuoServeError)
    async def on_duoserve_error(request: Request, error: DuoServeError) -> Response:
        return _error_response(routes, request, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        detail = error.detail if isinstance(error.detail, str) else "request failed"
        if error.status_code == 404:
            detail = f"no such endpoint: {request.method} {request.url.path[:200]}"
        wrapped = DuoServeError(detail, headers=dict(error.headers or {}))
        wrapped.status = error.status_code
        return _error_response(routes, request, wrapped)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        wrapped = DuoServeError(f"invalid request: {where}: {first.get('msg', 'invalid')}")
        wrapped.status = 400
        return _error_response(routes, request, wrapped)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        wrapped = DuoServeError("internal error; the gateway logged the details")
        return _error_response(routes, request, wrapped)

    # DuoServe's pure ASGI chain in front of every HTTP request: keys, then drain, then
    # disconnects, then dispatch (fast inference path or FastAPI).
    entry: ASGIApp = DrainMiddleware(
        CancelOnDisconnect(Dispatch(app, routes)), drain=drain, routes=routes
    )
    if keys is not None:
        known_models = set(config.models)

        def rate_limited(model: str | None) -> None:
            metrics.shed.labels(model if model in known_models else "unknown", "rate_limit").inc()

        entry = APIKeyMiddleware(
            entry,
            keys=keys,
            routes=routes,
            open_health=settings.open_health,
            open_metrics=settings.open_metrics,
            on_rate_limited=rate_limited,
        )
    if settings.access_log and settings.log_format == "json":
        entry = AccessLog(entry)  # outermost: refused and unauthorised requests are logged too
    app.entry = entry
    return app
