"""`duoserve serve | config check | models | compare | rollout status | keys new | keys hash |
bench`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from duoserve.config import ConfigError, load_config

    overrides = {
        "DUOSERVE_CONFIG": args.config,
        "DUOSERVE_HOST": args.host,
        "DUOSERVE_PORT": None if args.port is None else str(args.port),
        "DUOSERVE_WORKERS": None if args.workers is None else str(args.workers),
        "DUOSERVE_ROOT_PATH": args.root_path,
        "DUOSERVE_ACCESS_LOG": "true" if args.access_log else None,
    }
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = value  # workers (separate processes) read settings from env
    from duoserve.app import check_root_path
    from duoserve.logs import logging_config
    from duoserve.settings import Settings
    from duoserve.tracing import check_tracing

    try:
        settings = Settings()
        check_root_path(settings.root_path)
        load_config(settings.config)  # fail fast, before any worker starts
        check_tracing(os.environ)
    except (ConfigError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        print(error, file=sys.stderr)
        return 2
    if settings.api_keys_file:
        from duoserve.auth import KeyFileError, parse_keys_file

        try:
            parse_keys_file(settings.api_keys_file)
        except KeyFileError as error:
            print(error, file=sys.stderr)
            return 2
    # JSON lines: one configuration for this process and every worker (uvicorn applies it in
    # each); text: uvicorn's own formats, as before.
    from uvicorn.config import LOGGING_CONFIG

    log_config: dict[str, Any] = LOGGING_CONFIG
    if settings.log_format == "json":
        from logging.config import dictConfig

        log_config = logging_config(settings.log_level)
        dictConfig(log_config)
    else:
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
        )
    _check_open_file_limit(settings.max_connections)
    from duoserve.connections import GuardedHttpToolsProtocol

    uvicorn.run(
        "duoserve.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        # uvicorn's httptools protocol, with deadlines for slow clients and a connection cap.
        http=GuardedHttpToolsProtocol,
        ws="none",  # no WebSocket endpoint: an upgrade request is served as plain HTTP
        # No "server: uvicorn" on every answer: it tells a scanner what to try, and costs a
        # header per answer. ("date" stays: HTTP/1.1 origin servers send it.)
        server_header=False,
        log_level=settings.log_level,
        # In JSON the gateway writes its own access log (duoserve.logs.AccessLog).
        access_log=settings.access_log and settings.log_format == "text",
        log_config=log_config,
        # After SIGTERM and the drain delay (duoserve.drain): how long in-flight requests get.
        # 0 means none (not "forever", which uvicorn's None would be).
        timeout_graceful_shutdown=math.ceil(settings.drain_grace_s),
    )
    return 0


def _check_open_file_limit(max_connections: int) -> None:
    """Warn when the open-file limit would run out before the connection cap is reached."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    headroom = 256  # backends' connections, model files, the listener, logs
    if soft != resource.RLIM_INFINITY and soft < max_connections + headroom:
        logging.getLogger("duoserve").warning(
            "the open-file limit (%d) is below DUOSERVE_MAX_CONNECTIONS (%d) + %d: raise "
            "`ulimit -n` or lower DUOSERVE_MAX_CONNECTIONS, or clients may exhaust it first",
            soft,
            max_connections,
            headroom,
        )


def _keys_hash(args: argparse.Namespace) -> int:
    from duoserve.auth import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("give the key on stdin, e.g.: duoserve keys hash < key.txt", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    import yaml

    from duoserve.auth import hash_key, new_key

    key = new_key()
    entry: dict[str, object] = {
        "name": args.name,
        "sha256": hash_key(key),
        "models": "*" if args.models == "*" else [m for m in args.models.split(",") if m],
        "scopes": [s for s in args.scopes.split(",") if s],
    }
    if args.rate is not None:
        entry["rate_per_s"] = args.rate
        entry["burst"] = args.burst or max(1, math.ceil(args.rate))
    print(f"key (shown once, store it now): {key}")
    print("entry for the API keys file (DUOSERVE_API_KEYS_FILE):")
    print(yaml.safe_dump([entry], sort_keys=False, default_flow_style=None).rstrip())
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from duoserve.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    print(
        f"{args.config}: OK ({len(config.backends)} backends, {len(config.models)} models: "
        f"{', '.join(config.models)})"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from duoserve.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    for name, model in config.models.items():
        routes = ", ".join(
            f"{r.framework}@{r.backend}" + (f" w={r.weight:g}" if len(model.routes) > 1 else "")
            for r in model.routes
        )
        shadow = (
            f"  shadow: {model.shadow.framework}@{model.shadow.backend}" if model.shadow else ""
        )
        print(f"{name}: {routes}{shadow}")
    return 0


def _call_gateway(command: str, url: str, body: bytes | None = None) -> Any:
    """One call to a running gateway's admin API; its JSON answer, or None after a one-line
    message on stderr (HTTP error or unreachable gateway)."""
    import urllib.error
    import urllib.request

    headers = {"content-type": "application/json"}
    # From the environment, not the command line, where other users' `ps` would show it.
    key = os.environ.get("DUOSERVE_API_KEY")
    if key:
        headers["authorization"] = f"Bearer {key}"
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - user's URL
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            reason = json.loads(error.read())["error"]
        except (ValueError, KeyError, TypeError):
            reason = error.reason
        print(f"duoserve {command}: HTTP {error.code}: {reason}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as error:
        why = getattr(error, "reason", error)
        print(f"duoserve {command}: cannot reach {url}: {why}", file=sys.stderr)
    return None


def _compare(args: argparse.Namespace) -> int:
    try:
        with open(args.payload, "rb") as handle:
            body = handle.read()
    except OSError as error:
        print(f"duoserve compare: cannot read {args.payload}: {error.strerror}", file=sys.stderr)
        return 2
    url = f"{args.url.rstrip('/')}/v2/models/{args.model}/compare"
    report = _call_gateway("compare", url, body)
    if report is None:
        return 1
    for entry in report["results"]:
        outcome = f"{entry['latency_ms']:.2f} ms" if "latency_ms" in entry else entry["error"]
        print(f"{entry['framework']:<11} {entry['backend']:<12} {outcome}")
    for pair in report["agreement"]:
        diff = pair["max_abs_diff"]
        print(
            f"{pair['a']['framework']} vs {pair['b']['framework']}: argmax agreement "
            f"{pair['argmax_agree']}/{pair['rows']}, max abs diff "
            + ("n/a" if diff is None else f"{diff:.3g}")
        )
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    url = f"{args.url.rstrip('/')}/v2/models/{args.model}/rollout"
    status = _call_gateway("rollout status", url)
    if status is None:
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    target = status["target"]
    print(
        f"{status['model']}: rollout {status['rollout']} to {target['framework']} on "
        f"{target['backend']} ({status['gates_from']} gates)"
    )
    print(
        f"  phase {status['phase']}, step {status['step']} of {len(status['steps'])}, target "
        f"serves {status['target_weight']:g} %, copies {status['shadow_sample']:g} of the rest; "
        f"since {status['phase_started']}"
    )
    for name, gate in status["gates"].items():
        value = "n/a" if gate["value"] is None else f"{gate['value']:.4g}"
        print(f"  {name:<16} {value:>10}  (threshold {gate['threshold']:g})  {gate['state']}")
    for decision in status["history"]:
        print(f"  {decision['at']}  {decision['decision']:<8} {decision['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="models.yaml (env DUOSERVE_CONFIG)")
    serve.add_argument("--host", help="listen address (env DUOSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (env DUOSERVE_PORT, default 8000)")
    serve.add_argument(
        "--workers", type=int, help="1, the only value (scale with replicas; env DUOSERVE_WORKERS)"
    )
    serve.add_argument(
        "--root-path",
        help="URL path prefix the gateway is served below, e.g. /ml behind an ingress path; "
        "the proxy may strip it or not (env DUOSERVE_ROOT_PATH)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(run=_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a models.yaml")
    check.add_argument(
        "config", nargs="?", default=os.environ.get("DUOSERVE_CONFIG", "models.yaml")
    )
    check.set_defaults(run=_config_check)

    models = commands.add_parser("models", help="list the models and routes of a models.yaml")
    models.add_argument(
        "config", nargs="?", default=os.environ.get("DUOSERVE_CONFIG", "models.yaml")
    )
    models.set_defaults(run=_models)

    compare = commands.add_parser(
        "compare",
        help="run a V2 payload on every framework of a model",
        description="Run a V2 payload on every framework of a model. With API keys on, the "
        "key (admin scope) comes from the environment: DUOSERVE_API_KEY.",
    )
    compare.add_argument("model")
    compare.add_argument("payload", help="a V2 infer request body (JSON file)")
    compare.add_argument("--url", default="http://127.0.0.1:8000")
    compare.set_defaults(run=_compare)

    rollout = commands.add_parser("rollout", help="gated rollouts of a running gateway")
    rollout_commands = rollout.add_subparsers(dest="rollout_command", required=True)
    status = rollout_commands.add_parser(
        "status",
        help="phase, target's share, gates and decisions of a model's rollout",
        description="Where a model's rollout stands on a running gateway. With API keys on, "
        "the key (admin scope) comes from the environment: DUOSERVE_API_KEY.",
    )
    status.add_argument("model")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    status.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    status.set_defaults(run=_rollout_status)

    keys = commands.add_parser("keys", help="API keys for DUOSERVE_API_KEYS_FILE")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    hash_ = keys_commands.add_parser("hash", help="read a key on stdin, print its sha256")
    hash_.set_defaults(run=_keys_hash)
    new = keys_commands.add_parser("new", help="make a random key; print it once, and its entry")
    new.add_argument("--name", default="client", help="name of the key (logs, rate limits)")
    new.add_argument("--models", default="*", help='comma-separated models, or "*" (default)')
    new.add_argument("--scopes", default="infer", help="comma-separated: infer, admin")
    new.add_argument("--rate", type=float, help="requests per second allowed (token bucket)")
    new.add_argument("--burst", type=int, help="bucket size (default: the rate)")
    new.set_defaults(run=_keys_new)

    bench = commands.add_parser(
        "bench",
        help="load generator (the `bench` extra); `duoserve bench --help`",
        add_help=False,
    )
    # Listed for --help only: main() hands `bench` and its own options to duoserve_bench.
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


# What `duoserve bench` needs beyond the gateway: its own package and the `bench` extra's
# client. Any other missing module is a bug to show, not an installation to suggest.
BENCH_MODULES = ("duoserve_bench", "aiohttp")
BENCH_MISSING = (
    "duoserve bench: the load generator is not installed (no module {name}); "
    "install it with: pip install 'duoserve[bench]' (in a checkout: pip install -e '.[bench]')"
)


def _bench(argv: list[str]) -> int:
    try:
        from duoserve_bench.cli import main as bench_main
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in BENCH_MODULES:
            raise
        print(BENCH_MISSING.format(name=error.name), file=sys.stderr)
        return 2
    return bench_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options are its own; argparse.REMAINDER would eat none
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
