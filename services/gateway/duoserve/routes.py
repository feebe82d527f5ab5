"""The gateway's one route table: what every route is, declared once next to the route, and
matched once per request on the path below the root path.

Each front door declares its routes on a ``FrontDoor``: the path and FastAPI's options as usual,
plus what the route is (``Kind``: who may call it), which path parameter names the model,
whether the gateway's own dispatch serves it (``fast``), and, for readiness, what it answers
while draining. The door names its error body shape once, for all its routes.

``RouteTable`` reads those declarations off the app's routes, in FastAPI's matching order, with
the regexes FastAPI compiled. ``resolve(scope)`` matches a request once and keeps the match in
the ASGI scope: API keys, drain, the fast dispatch and error rendering all read that one match,
so they can never disagree about a request, nor with FastAPI's router, which matches the same
path (``scope["path"]`` below ``scope["root_path"]``) with the same regexes in the same order.

Root path. The gateway may be served below a path prefix (``DUOSERVE_ROOT_PATH``, or the
``root_path`` an ASGI server passes, as ``uvicorn --root-path`` does). A request is matched on
its path below that prefix, whether the proxy in front stripped the prefix or forwarded the path
as is: ``/ml/v2/models/m/infer`` and ``/v2/models/m/infer`` are the same route. The scope is then
normalised the way uvicorn and Starlette expect (``root_path`` the prefix, ``path`` the prefix
plus the path below it), so FastAPI routes the same path and serves /docs and /openapi.json
below the prefix. ``DUOSERVE_ROOT_PATH`` replaces any root path the server passes. (uvicorn
given ``--root-path`` itself puts the prefix before every path it received, so behind it the
proxy must strip the prefix; ``duoserve serve --root-path`` sets DUOSERVE_ROOT_PATH instead.)
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from duoserve.errors import DuoServeError

SCOPE_KEY = "duoserve.route"
"""Where a request's ``RouteMatch`` is kept in its ASGI scope."""

Handler = Callable[..., Awaitable[Response]]
ErrorBody = Callable[[DuoServeError], bytes]
Endpoint = TypeVar("Endpoint", bound=Handler)


class Kind(StrEnum):
    """What a route is, which decides what an API key needs to call it (duoserve.auth)."""

    INFER = "infer"
    """Inference and model metadata: a key with the infer (or admin) scope, granted the model."""
    ADMIN = "admin"
    """Needs a key with the admin scope (compare), granted the model."""
    HEALTH = "health"
    """Probes: open without a key unless DUOSERVE_OPEN_HEALTH=false."""
    METRICS = "metrics"
    """Scrapers: open without a key unless DUOSERVE_OPEN_METRICS=false."""
    OTHER = "other"
    """Anything else, paths that match no route included: any valid key."""


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What one route is, as its front door declared it."""

    kind: Kind
    errors: ErrorBody
    """The front door's error body (``{"error"}`` or TorchServe's ``{"code","type","message"}``)."""
    model_param: str | None = None
    """The path parameter that names the model, if the route serves one model."""
    fast: bool = False
    """The gateway's own dispatch serves it, without FastAPI's router (app.Dispatch)."""
    draining: bytes | None = None
    """Readiness routes: the body of the 503 answered while the gateway drains."""


@dataclass(slots=True)
class RouteMatch:
    """A request's route: what it is, and what the fast dispatch needs to serve it."""

    info: RouteInfo
    path: str
    """The path below the root path."""
    params: dict[str, str]
    model: str | None
    """The model the path names (the declared path parameter), if any."""
    route: Route | None = None
    """The route FastAPI picks for the request (its method may not match: 405); None: 404."""
    endpoint: Handler | None = None
    """Set when the fast dispatch serves this request: a fast route, and its method."""


_DECLARED: dict[Callable[..., Any], RouteInfo] = {}
# Keyed by endpoint, not by route object: FastAPI versions that copy routes on include_router
# keep the endpoint, so the declaration is found on the app's routes either way.

FAST_ENDPOINTS: set[Callable[..., Any]] = set()
"""Endpoints marked with ``frontends.http.fast_path`` outside a FrontDoor."""


class FrontDoor:
    """One client protocol's routes: an APIRouter on which every route says what it is."""

    def __init__(self, name: str, *, errors: ErrorBody) -> None:
        self.router = APIRouter(tags=[name])
        self.errors = errors

    def route(
        self,
        path: str,
        kind: Kind,
        *,
        methods: list[str],
        model: str | None = None,
        fast: bool = False,
        draining: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Callable[[Endpoint], Endpoint]:
        """Declare ``path`` on the router (``options`` go to FastAPI) and what it is.

        ``model``: the path parameter naming the model; ``fast``: the gateway's own dispatch
        serves it (an ``async def (request, **path_params) -> Response`` whose parameters are all
        plain strings); ``draining``: the JSON a readiness route answers (503) while draining."""

        def declare(endpoint: Endpoint) -> Endpoint:
            if endpoint in _DECLARED:  # what a route is, is looked up by its endpoint
                raise ValueError(f"{path}: {endpoint.__name__} already serves another route")
            self.router.add_api_route(path, endpoint, methods=methods, **options)
            route = self.router.routes[-1]
            assert isinstance(route, APIRoute)
            if model is not None and model not in route.param_convertors:
                raise ValueError(f"{path}: no path parameter '{model}' names the model")
            if fast:
                _check_fast(route)
            _DECLARED[endpoint] = RouteInfo(
                kind=kind,
                errors=self.errors,
                model_param=model,
                fast=fast,
                draining=None if draining is None else orjson.dumps(dict(draining)),
            )
            return endpoint

        return declare

    def get(self, path: str, kind: Kind, **declared: Any) -> Callable[[Endpoint], Endpoint]:
        return self.route(path, kind, methods=["GET"], **declared)

    def post(self, path: str, kind: Kind, **declared: Any) -> Callable[[Endpoint], Endpoint]:
        return self.route(path, kind, methods=["POST"], **declared)


def _check_fast(route: Route) -> None:
    # The fast dispatch passes the matched strings as they are, without FastAPI's conversion.
    if any(c.regex != "[^/]+" for c in route.param_convertors.values()):
        raise ValueError(f"{route.path}: fast-path parameters must be plain strings")


def _first_segment(path: str) -> str:
    """``/v2/models/m/infer`` -> ``v2``."""
    parts = path.split("/", 2)
    return parts[1] if len(parts) > 1 else ""


@dataclass(frozen=True, slots=True)
class _Entry:
    route: Route
    match: Callable[[str], re.Match[str] | None]  # the route's compiled path regex
    methods: frozenset[str] | None  # None: any method
    info: RouteInfo
    endpoint: Handler | None  # the fast dispatch's, when the route is fast

    def matched(self, path: str, params: dict[str, str], full: bool) -> RouteMatch:
        model_param = self.info.model_param
        model = params.get(model_param) if model_param is not None else None
        return RouteMatch(
            self.info, path, params, model, self.route, self.endpoint if full else None
        )


class RouteTable:
    """Every route in FastAPI's matching order, with what it is; matches a request once.

    ``routes``: the app's routes as FastAPI holds them (routers it included are looked into).
    ``errors``: the error body of routes no front door declared, and of paths that match
    nothing, unless every route sharing the path's first segment has one shape (so
    ``/predictions/m/1/extra`` still answers in TorchServe's shape).
    ``root_path``: DUOSERVE_ROOT_PATH (see the module's docstring); empty to follow the server.
    """

    def __init__(self, routes: Iterable[Any], *, errors: ErrorBody, root_path: str = "") -> None:
        self.root_path = root_path
        self.default = RouteInfo(Kind.OTHER, errors)
        self.routes: list[Route] = list(_flatten(routes))
        """Every route, in matching order."""
        entries: list[tuple[str | None, _Entry]] = []  # (first segment, None when a parameter)
        for route in self.routes:
            info = _DECLARED.get(route.endpoint)
            if info is None:
                info = RouteInfo(Kind.OTHER, errors, fast=route.endpoint in FAST_ENDPOINTS)
            if info.fast:
                _check_fast(route)
            segment: str | None = _first_segment(route.path)
            if segment is not None and "{" in segment:
                segment = None
            methods = frozenset(route.methods) if route.methods else None
            endpoint = route.endpoint if info.fast else None
            entry = _Entry(route, route.path_regex.match, methods, info, endpoint)
            entries.append((segment, entry))
        # Matching stays cheap on the fast path: a path is tried only against the routes that
        # can match its first segment (that literal segment, or a parameter there), and first
        # against those of its method, all in the original order.
        self._wild = [entry for segment, entry in entries if segment is None]
        self._by_segment: dict[str, list[_Entry]] = {}
        self._by_method: dict[tuple[str, str], list[_Entry]] = {}
        self._unmatched: dict[str, RouteInfo] = {}
        all_methods = {m for _, e in entries for m in e.methods or ()}
        for segment in {s for s, _ in entries if s is not None}:
            candidates = [e for s, e in entries if s in (segment, None)]
            self._by_segment[segment] = candidates
            for method in all_methods:
                self._by_method[method, segment] = [
                    e for e in candidates if e.methods is None or method in e.methods
                ]
            shapes = {e.info.errors for s, e in entries if s == segment}
            if len(shapes) == 1:
                self._unmatched[segment] = RouteInfo(Kind.OTHER, shapes.pop())
        if root_path and _first_segment(root_path) in self._by_segment:
            # Requests may come with the prefix or without it: /v2 would hide every /v2 route.
            raise ValueError(
                f"root path {root_path}: /{_first_segment(root_path)} is one of the gateway's own "
                "paths; choose a prefix that no route of the gateway starts with"
            )

    def match(self, method: str | None, path: str) -> RouteMatch:
        """The route of ``method`` (None: any) on ``path`` (below the root path), as FastAPI's
        router picks it: the first route whose path and method match, else the first whose path
        matches (FastAPI answers 405 there), else none (404)."""
        parts = path.split("/", 2)  # _first_segment, inlined: this runs on every request
        segment = parts[1] if len(parts) > 1 else ""
        if method is not None:  # the common case, kept short: a route of the request's method
            for entry in self._by_method.get((method, segment), ()):
                found = entry.match(path)
                if found is not None:
                    params = found.groupdict()
                    model = entry.info.model_param
                    return RouteMatch(
                        entry.info,
                        path,
                        params,
                        params.get(model) if model is not None else None,
                        entry.route,
                        entry.endpoint,
                    )
        partial: tuple[_Entry, dict[str, str]] | None = None
        for entry in self._by_segment.get(segment, self._wild):
            found = entry.match(path)
            if found is None:
                continue
            params = found.groupdict()
            if method is None or entry.methods is None or method in entry.methods:
                return entry.matched(path, params, True)
            if partial is None:
                partial = (entry, params)
        if partial is not None:
            return partial[0].matched(path, partial[1], False)
        return RouteMatch(self._unmatched.get(segment, self.default), path, {}, None)

    def resolve(self, scope: Scope) -> RouteMatch:
        """The request's match, made on its first call and kept in the scope for the others."""
        found: RouteMatch | None = scope.get(SCOPE_KEY)
        if found is None:
            root = self.root_path or scope.get("root_path")
            path = self.below_root(scope) if root else scope["path"]
            found = scope[SCOPE_KEY] = self.match(scope["method"], path)
        return found

    def below_root(self, scope: Scope) -> str:
        """The request's path below the root path; normalises the scope (module docstring)."""
        path: str = scope["path"]
        root: str = self.root_path or scope.get("root_path", "")
        if not root:
            return path
        if path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            scope["root_path"] = root  # a proxy that forwards the prefix: it may have said none
            return path[len(root) :]
        # The proxy stripped the prefix (or a probe called the gateway directly).
        scope["path"] = root + path
        raw = scope.get("raw_path")
        if raw is not None:
            scope["raw_path"] = root.encode("ascii") + raw
        scope["root_path"] = root
        return path

    def error_body(self, scope: Scope | None, error: DuoServeError) -> bytes:
        """``error`` in the shape of the request's front door (the default with no request)."""
        info = self.resolve(scope).info if scope is not None else self.default
        return info.errors(error)


def _flatten(routes: Iterable[Any]) -> Iterable[Route]:
    """Routes in matching order; a router FastAPI included in place (FastAPI >= 0.16x keeps
    ``original_router``; older ones copied the routes) is looked into."""
    for route in routes:
        if isinstance(route, Route):
            yield route
            continue
        included = getattr(route, "original_router", None)
        if isinstance(included, APIRouter):
            yield from _flatten(included.routes)
        # Anything else (mounts, WebSocket routes) is none of DuoServe's; its paths are OTHER.
