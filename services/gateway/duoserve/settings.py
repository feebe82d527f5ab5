"""Process settings, from the environment (prefix DUOSERVE_) or arguments."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """How one gateway process runs. Models and backends live in models.yaml (``config``)."""

    model_config = SettingsConfigDict(env_prefix="DUOSERVE_", extra="ignore")

    config: str = "models.yaml"
    """Path of models.yaml."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port to listen on."""
    workers: int = Field(default=1, ge=1, le=64)
    """uvicorn worker processes."""
    server_name: str = "duoserve"
    """Name reported by GET /v2."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    """Largest request body accepted, after decompression; larger ones get 413."""
    api_keys_file: str | None = None
    """YAML/JSON file of hashed API keys (see duoserve.auth); unset means no authentication
    (the laptop default)."""
    open_health: bool = True
    """Health endpoints answer without an API key (probes)."""
    open_metrics: bool = True
    """/metrics answers without an API key (scrapers)."""
    backend_probe_interval_s: float = Field(default=5.0, gt=0)
    """How often backend readiness (duoserve_backend_up) is refreshed."""
    drain_grace_s: float = Field(default=20.0, ge=0)
    """On SIGTERM: how long in-flight requests may take to finish once the listener closed."""
    drain_delay_s: float = Field(default=2.0, ge=0, le=300)
    """On SIGTERM: how long readiness answers 503 (while requests are still served) before the
    listener closes, so load balancers stop sending traffic first."""
    circuit_failure_threshold: int = Field(default=5, ge=1, le=1000)
    """Consecutive failed calls that open a backend's circuit."""
    circuit_reset_s: float = Field(default=2.0, gt=0, le=600)
    """How long an open circuit refuses calls before one probe call is let through."""
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    """Retries in progress allowed, as a share of the calls in progress."""
    retry_budget_min: int = Field(default=3, ge=0, le=1000)
    """Retries in progress always allowed, however few calls are in progress."""
    log_level: str = "info"
    """uvicorn log level."""
