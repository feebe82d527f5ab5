"""What the reload and rollout tests share: an in-process gateway read from a models.yaml file
(so reloads see its edits), and clients that keep it busy and record who served each request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from prometheus_client import CollectorRegistry

from duoserve.app import create_app
from duoserve.settings import Settings
from tests.conftest import v2_body


@asynccontextmanager
async def gateway_from_file(
    path: Path, data: dict[str, Any], **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """An in-process gateway on ``data`` written to ``path``: (client, app)."""
    path.write_text(yaml.safe_dump(data))
    app = create_app(Settings(config=str(path), **settings), registry=CollectorRegistry())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app


@dataclass(frozen=True, slots=True)
class Answer:
    sent: float
    """When the request was sent (routing is decided as a request starts)."""
    framework: str | None
    backend: str | None
    status: int


class Traffic:
    """Closed-loop clients posting held-out digits to /v2/models/digits/infer until stopped,
    spread over ``clients`` (several gateway replicas, or one)."""

    def __init__(self, clients: list[httpx.AsyncClient], images: np.ndarray) -> None:
        self.clients = clients
        self.images = images
        self.served: list[Answer] = []
        self.stop = False

    async def run(self, concurrency: int = 4) -> None:
        async def one(k: int) -> None:
            client = self.clients[k % len(self.clients)]
            i = k
            while not self.stop:
                # In process, a request that fails at once never suspends: let the loop run.
                await asyncio.sleep(0)
                image = self.images[i % len(self.images)][None]
                i += concurrency
                sent = time.time()
                answer = await client.post("/v2/models/digits/infer", json=v2_body(image))
                self.served.append(
                    Answer(
                        sent,
                        answer.headers.get("x-duoserve-framework"),
                        answer.headers.get("x-duoserve-backend"),
                        answer.status_code,
                    )
                )

        await asyncio.gather(*(one(k) for k in range(concurrency)))

    @asynccontextmanager
    async def running(self, concurrency: int = 4) -> AsyncIterator[Traffic]:
        """Traffic for the duration of a ``with`` block, stopped (and awaited) on the way out."""
        task = asyncio.create_task(self.run(concurrency))
        try:
            yield self
        finally:
            self.stop = True
            await task

    def statuses(self) -> set[int]:
        return {a.status for a in self.served}

    def frameworks(self, since: float = 0.0, until: float = float("inf")) -> list[str | None]:
        return [a.framework for a in self.served if since < a.sent < until]
