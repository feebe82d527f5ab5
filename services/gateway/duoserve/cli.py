"""`duoserve serve | config check | models | compare | bench`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from duoserve.config import ConfigError, load_config

    overrides = {
        "DUOSERVE_CONFIG": args.config,
        "DUOSERVE_HOST": args.host,
        "DUOSERVE_PORT": None if args.port is None else str(args.port),
        "DUOSERVE_WORKERS": None if args.workers is None else str(args.workers),
    }
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = value  # workers (separate processes) read settings from env
    from duoserve.settings import Settings

    settings = Settings()
    try:
        load_config(settings.config)  # fail fast, before any worker starts
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        "duoserve.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=int(settings.drain_grace_s) or None,
    )
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


def _compare(args: argparse.Namespace) -> int:
    import urllib.request

    with open(args.payload, "rb") as handle:
        body = handle.read()
    request = urllib.request.Request(
        f"{args.url.rstrip('/')}/v2/models/{args.model}/compare",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - user's own URL
        report = json.load(response)
    for entry in report["results"]:
        outcome = f"{entry['latency_ms']:.2f} ms" if "latency_ms" in entry else entry["error"]
        print(f"{entry['framework']:<11} {entry['backend']:<12} {outcome}")
    for pair in report["agreement"]:
        print(
            f"{pair['a']['framework']} vs {pair['b']['framework']}: argmax agreement "
            f"{pair['argmax_agree']}/{pair['rows']}, max abs diff {pair['max_abs_diff']:.3g}"
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from duoserve.bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="models.yaml (env DUOSERVE_CONFIG)")
    serve.add_argument("--host", help="listen address (env DUOSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (env DUOSERVE_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (env DUOSERVE_WORKERS)")
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

    compare = commands.add_parser("compare", help="run a V2 payload on every framework of a model")
    compare.add_argument("model")
    compare.add_argument("payload", help="a V2 infer request body (JSON file)")
    compare.add_argument("--url", default="http://127.0.0.1:8000")
    compare.set_defaults(run=_compare)

    bench = commands.add_parser(
        "bench", help="load generator; `duoserve bench --help`", add_help=False
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
