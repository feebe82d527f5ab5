"""Live configuration: the gateway reloads models.yaml on SIGHUP and when the file changes.

The file is read again every ``config_poll_s`` and compared by content (SHA-256), so every way
a file can change is seen: an edit in place, a rename over it, and the symlink swap with which
Kubernetes updates a mounted ConfigMap (``..data`` pointed at a new folder). A new file is
validated whole before it replaces the old; a bad one is refused with the key path of every
problem and the old configuration keeps serving. The swap itself is DataPlane.reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from duoserve.backends.base import Backend
from duoserve.config import ConfigError, GatewayConfig, parse_config
from duoserve.dataplane import DataPlane, ReloadError
from duoserve.metrics import Metrics

log = logging.getLogger(__name__)


def digest(content: bytes) -> str:
    """The short name of one models.yaml: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(content).hexdigest()[:12]


class ConfigReloader:
    """Watches models.yaml at ``path`` and swaps each valid new version in."""

    def __init__(
        self,
        path: Path,
        dataplane: DataPlane,
        build: Callable[[GatewayConfig, set[str]], dict[str, Backend]],
        metrics: Metrics,
        *,
        loaded: bytes | None,
        drain_s: float = 30.0,
    ) -> None:
        """``loaded``: the bytes the serving configuration was read from (None when it did not
        come from the file: then only a change of the file reloads)."""
        self.path = path
        self.dataplane = dataplane
        self.build = build
        self.metrics = metrics
        self.drain_s = drain_s
        self.current = digest(loaded) if loaded is not None else None
        self._refused: str | None = None
        self._lock = asyncio.Lock()
        if self.current is not None:
            metrics.config_info.labels(self.current).set(1)
        metrics.config_refused.labels().set(0)

    async def check(self, forced: bool = False) -> str:
        """Reload if the file changed (or when ``forced``, as SIGHUP does): "ok", "unchanged"
        or "error"."""
        async with self._lock:
            try:
                content = await asyncio.to_thread(self.path.read_bytes)
            except OSError as error:
                return self._refuse(f"cannot read {self.path}: {error.strerror}", None)
            name = digest(content)
            if name == self.current:
                self.metrics.config_refused.labels().set(0)  # the bad file was taken back
            if name == self.current or (name == self._refused and not forced):
                if forced:
                    self.metrics.config_reloads.labels("unchanged").inc()
                return "unchanged"
            try:
                data = yaml.safe_load(content)
                config = parse_config(data, str(self.path))
            except yaml.YAMLError as error:
                return self._refuse(f"{self.path} is not valid YAML: {error}", name)
            except ConfigError as error:
                return self._refuse(str(error), name)
            try:
                changes = await self.dataplane.reload(config, self.build, self.drain_s)
            except ReloadError as error:
                return self._refuse(f"{self.path} could not be put in place: {error}", name)
            if self.current is not None:
                self.metrics.config_info.remove(self.current)
            self.current, self._refused = name, None
            self.metrics.config_info.labels(name).set(1)
            self.metrics.config_refused.labels().set(0)
            self.metrics.config_reloads.labels("ok").inc()
            log.warning(
                "models.yaml %s loaded: backends kept %s, started %s, closing %s",
                name,
                changes["kept"],
                changes["started"],
                changes["closing"],
            )
            return "ok"

    def _refuse(self, why: str, name: str | None) -> str:
        self._refused = name
        self.metrics.config_reloads.labels("error").inc()
        self.metrics.config_refused.labels().set(1)
        log.error("models.yaml not reloaded; the previous configuration keeps serving.\n%s", why)
        return "error"

    async def run(self, poll_s: float) -> None:
        """Check the file every ``poll_s`` seconds (for the app's lifetime)."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad reload
                log.exception("reloading models.yaml failed")
