"""API keys: a file of hashed keys, scopes, per-model grants and per-key rate limits, enforced by
one pure ASGI middleware in front of every route.

The file (``DUOSERVE_API_KEYS_FILE``, YAML or JSON) is a list of keys, or ``{keys: [...]}``::

    keys:
      - name: shop-frontend          # shown in logs, never the key itself
        sha256: 9f86d08...           # hex SHA-256 of the key (`duoserve keys hash`)
        models: [digits]             # or "*" (every model)
        scopes: [infer]              # infer: inference and metadata; admin: also compare
        rate_per_s: 50               # optional token bucket: sustained requests per second
        burst: 100                   # and how many may come at once (default: rate, at least 1)

Clients send ``Authorization: Bearer <key>`` or ``x-api-key: <key>``. Without a valid key the
answer is 401 (with ``WWW-Authenticate: Bearer``); a valid key used on a model it was not granted,
or on compare without the admin scope, gets 403; past its rate, 429 with ``Retry-After``.

Why plain SHA-256, unsalted: keys are 256-bit random tokens (``duoserve keys new``), not
passwords, so neither dictionary attacks nor rainbow tables apply and a slow salted hash would
only add latency to every request. The file therefore holds nothing that lets anyone call the
gateway. Lookup is by digest; a timing difference in that lookup can reveal only bits of a
digest, which say nothing about any key. Rate limits are per gateway process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from duoserve.errors import DuoServeError, Forbidden, TooManyRequests, Unauthorized
from duoserve.routes import Kind, RouteTable

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_PREFIX = "dsk_"
MAX_KEY_LENGTH = 256


class KeyFileError(ValueError):
    """The keys file is missing, unreadable or invalid; the message names the bad entry."""


class KeyEntry(BaseModel):
    """One key of the keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    models: list[str] | Literal["*"] = "*"
    scopes: tuple[Literal["infer", "admin"], ...] = ("infer",)
    rate_per_s: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


def hash_key(key: str) -> str:
    """The hex SHA-256 the keys file stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key: 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per request."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(slots=True)
class APIKey:
    """A loaded key: what it may do, and its rate limiter."""

    name: str
    sha256: str
    models: frozenset[str] | None  # None: every model
    scopes: frozenset[str]
    bucket: TokenBucket | None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class KeyRing:
    """The keys of one keys file, looked up by the digest of a presented key."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self._by_digest: dict[str, APIKey] = {}
        for entry in entries:
            bucket = None
            if entry.rate_per_s is not None:
                burst = entry.burst or max(1, math.ceil(entry.rate_per_s))
                bucket = TokenBucket(entry.rate_per_s, burst)
            self._by_digest[entry.sha256] = APIKey(
                name=entry.name,
                sha256=entry.sha256,
                models=None if entry.models == "*" else frozenset(entry.models),
                scopes=frozenset(entry.scopes),
                bucket=bucket,
            )

    def find(self, presented: str) -> APIKey | None:
        digest = hash_key(presented)
        key = self._by_digest.get(digest)
        # The dict lookup found a candidate; confirm in constant time all the same.
        if key is None or not hmac.compare_digest(key.sha256, digest):
            return None
        return key

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        return cls(parse_keys_file(path))


def parse_keys_file(path: str | Path) -> list[KeyEntry]:
    """Read and validate a keys file; KeyFileError names the offending entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise KeyFileError(f"cannot read the API keys file {path}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise KeyFileError(f"{path} is not valid YAML/JSON: {error}") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if not isinstance(data, list):
        raise KeyFileError(f"{path}: expected a list of keys (or a mapping with 'keys')")
    entries: list[KeyEntry] = []
    names: set[str] = set()
    digests: set[str] = set()
    for index, item in enumerate(data):
        try:
            entry = KeyEntry.model_validate(item)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}"
                for e in error.errors()
            )
            raise KeyFileError(f"{path}: keys.{index}: {problems}") from None
        if entry.name in names:
            raise KeyFileError(f"{path}: keys.{index}: the name '{entry.name}' is used twice")
        if entry.sha256 in digests:
            raise KeyFileError(f"{path}: keys.{index}: the same key is listed twice")
        names.add(entry.name)
        digests.add(entry.sha256)
        entries.append(entry)
    return entries


# -- which paths need what -------------------------------------------------------------------
# Each route declares what it is (duoserve.routes.Kind) where its front door defines it.


def classify(path: str) -> tuple[str, str | None]:
    """(what the path is, the model it names), as the front doors declare their routes; for
    callers holding only a path below the root path. Requests are matched in the middleware."""
    from duoserve.app import front_door_routes  # the app imports this module

    found = front_door_routes().match(None, path)
    return found.info.kind, found.model


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key from ``Authorization: Bearer`` or ``x-api-key``; None when neither is there."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif name == b"x-api-key" and value.strip():
            return value.strip().decode("latin-1")
    return None


class APIKeyMiddleware:
    """401 / 403 / 429 before any route runs; everything else passes straight through.

    What a request needs is what its route declares (``routes``: the request's match, below
    the root path); refusals come in that route's front door's error shape.
    ``on_rate_limited(model)`` counts a refusal.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        *,
        routes: RouteTable,
        open_health: bool = True,
        open_metrics: bool = True,
        on_rate_limited: Callable[[str | None], None] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.routes = routes
        self.open_health = open_health
        self.open_metrics = open_metrics
        self.on_rate_limited = on_rate_limited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self.routes.resolve(scope)
        kind = found.info.kind
        if (kind is Kind.HEALTH and self.open_health) or (
            kind is Kind.METRICS and self.open_metrics
        ):
            await self.app(scope, receive, send)
            return
        error = self._check(scope, kind, found.model)
        if error is not None:
            await self._reject(send, found.info.errors(error), error)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, kind: Kind, model: str | None) -> DuoServeError | None:
        presented = presented_key(scope["headers"])
        if presented is None:
            return Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        key = self.keys.find(presented) if len(presented) <= MAX_KEY_LENGTH else None
        if key is None:
            return Unauthorized("the API key is not valid")
        if kind is Kind.ADMIN and "admin" not in key.scopes:
            return Forbidden("this endpoint needs an API key with the 'admin' scope")
        if kind is Kind.INFER and not key.scopes & {"infer", "admin"}:
            return Forbidden("this API key has no 'infer' scope")
        if model is not None and not key.may_use(model):
            return Forbidden(f"this API key may not use model '{model[:128]}'")
        if key.bucket is not None:
            wait_s = key.bucket.take()
            if wait_s > 0:
                if self.on_rate_limited is not None:
                    self.on_rate_limited(model)
                return TooManyRequests(
                    f"API key '{key.name}' is over its rate limit; retry after the Retry-After "
                    "seconds",
                    retry_after_s=math.ceil(wait_s),
                )
        scope.setdefault("state", {})["api_key"] = key.name
        return None

    async def _reject(self, send: Send, body: bytes, error: DuoServeError) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()),
        ]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
