"""Process settings, from the environment (prefix DUOSERVE_) or arguments."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
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
    root_path: str = ""
    """URL path prefix the gateway is served below, e.g. ``/ml`` behind an ingress path; empty
    for none. Requests are served with the prefix (a proxy that forwards the path as is) and
    without it (a proxy that strips it, probes calling the pod directly); API keys, drain and
    error shapes apply to the path below it, and /docs and /openapi.json are served below it.
    It replaces any root path the ASGI server passes (``uvicorn --root-path``). Its first
    segment must not be one of the gateway's own (v1, v2, predictions, ping, metrics, docs)."""
    workers: int = Field(default=1, ge=1)
    """Worker processes: 1, the only value accepted. Every worker keeps its own metrics, load
    limits, circuit breakers, rollout state and backend connections, and a scrape of a port that
    several workers share reads one of them at random, so the counters a dashboard or a rollout
    gate sums would be wrong. Scale with gateway replicas (Kubernetes pods), each scraped on its
    own."""
    server_name: str = "duoserve"
    """Name reported by GET /v2."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    """Largest request body accepted, after decompression; larger ones get 413."""
    client_header_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long a client may take to send a request's head (request line and headers), from
    its connection opening (first request) or the head's first byte (later ones); past it, 408
    and the connection closed (closed without an answer when not a byte came). nginx's
    client_header_timeout."""
    client_body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long a request body may pause between two reads; past it, 408 and the connection
    closed. nginx's client_body_timeout."""
    client_body_total_s: float = Field(default=120.0, gt=0, le=3600)
    """How long a request body may take in all, however steadily it trickles in (a byte every
    few seconds never trips the pause timeout); past it, 408. 120 s carries the largest body
    (``max_body_bytes``, 4 MiB) at 35 KB/s."""
    max_head_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest request head (request line and headers) accepted; larger ones get 431 and the
    connection closed (uvicorn itself takes a head of any size into memory)."""
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Client connections one worker keeps open at once, idle and slow ones included; a
    connection past it is answered 503 and closed at once. Keep it under the process's open-file
    limit (``ulimit -n``), with room for the backends' connections."""
    api_keys_file: str | None = None
    """YAML/JSON file of hashed API keys (see duoserve.auth); unset means no authentication
    (the laptop default)."""
    open_health: bool = True
    """Health endpoints answer without an API key (probes)."""
    open_metrics: bool = True
    """/metrics answers without an API key (scrapers)."""
    config_poll_s: float = Field(default=2.0, ge=0, le=3600)
    """How often models.yaml is read again: a changed (and valid) file is put in place while
    requests keep flowing; SIGHUP reloads at once. 0: only SIGHUP."""
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
    retry_budget_min: int = Field(default=10, ge=0, le=1000)
    """Retries in progress always allowed, however few calls are in progress. Enough for the
    calls a replica had in flight when it died to be retried on the others at once."""
    log_level: str = "info"
    """uvicorn log level."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line (time, level, logger, message, and the request id,
    trace and span id, model, framework and backend of the request that caused it); ``text``:
    ``LEVEL logger: message``."""
    access_log: bool = False
    """One line per HTTP request (``duoserve serve --access-log``): uvicorn's in the text format;
    in the JSON format the gateway's own, with status, latency and the request's ids."""

    @field_validator("workers")
    @classmethod
    def _one_worker(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                f"DUOSERVE_WORKERS={value}: the gateway runs one worker per process, because each "
                "worker would keep its own metrics and a scrape would read one worker's counters. "
                "Run more gateway replicas instead (Kubernetes pods behind the Service, each "
                "scraped on its own); set DUOSERVE_WORKERS=1 or leave it unset"
            )
        return value

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        value = value.rstrip("/")  # "/" alone means no prefix
        if value and not (
            value.startswith("/")
            and value.isascii()
            and value.isprintable()
            and " " not in value
            and "//" not in value
            and not any(c in value for c in "?#%")
        ):
            raise ValueError(
                "must be a URL path such as /ml: starting with '/', printable ASCII, without "
                "spaces, '//', '?', '#' or '%'"
            )
        return value
