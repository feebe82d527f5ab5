"""The pooled HTTP client the REST backends share, and its failure mapping."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from duoserve.errors import (
    BadRequest,
    DuoServeError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from duoserve.resilience import Deadline


def new_session(max_connections: int) -> aiohttp.ClientSession:
    """One keep-alive pool per backend, sized to its concurrency limit."""
    connector = aiohttp.TCPConnector(
        limit=max_connections, keepalive_timeout=30, enable_cleanup_closed=True
    )
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
    )


class SessionPool:
    """A backend's one keep-alive session, opened on first use and never again after close()
    (a late probe or shadow call must not leave an unclosed session behind)."""

    def __init__(self, max_connections: int, what: str) -> None:
        self.max_connections = max_connections
        self.what = what
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def get(self) -> aiohttp.ClientSession:
        if self._closed:
            raise Unavailable(f"the {self.what} backend is shut down", reason="closed")
        if self._session is None or self._session.closed:
            self._session = new_session(self.max_connections)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    what: str,
    deadline: Deadline,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, Mapping[str, str]]:
    """(status, body, headers) of one call that must finish before ``deadline``.

    Refused or dropped connections are Unavailable (the backend did not process the call, so it
    may be retried or failed over); a call past the deadline is UpstreamTimeout. Messages name
    the backend kind, never its address.
    """
    timeout = aiohttp.ClientTimeout(total=deadline.check(f"the {what} call"))
    try:
        async with session.request(
            method, url, data=body, headers=headers, timeout=timeout
        ) as response:
            return response.status, await response.read(), response.headers.copy()
    except TimeoutError:
        raise UpstreamTimeout(
            f"the {what} backend did not answer within the deadline "
            f"({deadline.budget_s * 1000:.0f} ms)"
        ) from None
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as error:
        raise Unavailable(f"the {what} backend is not reachable", reason="backend_down") from error
    except aiohttp.ClientError as error:
        raise UpstreamError(f"the {what} call failed ({type(error).__name__})") from error


def status_error(status: int, server: str, what: str, detail: str = "") -> DuoServeError:
    """The gateway's error for a backend's non-200 answer, the table every REST backend shares:
    400 the client's input, 404 unknown model or version, 413 too large, 429/503 at capacity
    (not processed: retryable), 408/504 timeout, anything else the backend's own failure.
    ``detail`` is the backend's sanitised message; backends handle their quirks first."""
    if status == 400:
        return BadRequest(detail or f"{server} rejected the input of {what}")
    if status == 404:
        suffix = f": {detail}" if detail else ""
        return NotFound(f"{what} is not available on the {server} backend{suffix}")
    if status == 413:
        return PayloadTooLarge(f"the request is larger than {server} accepts")
    if status in (429, 503):
        return Overloaded(f"{server} is at capacity for {what}; retry shortly")
    if status in (408, 504):
        return UpstreamTimeout(f"{server} timed out running {what}")
    return UpstreamError(f"{server} failed running {what} (HTTP {status})")
