"""Command line mirroring tensorflow_model_server's flags (the subset the stand-in honours)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf import text_format


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.tfserving_standin")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port")
    parser.add_argument("--rest_api_port", type=int, default=0, help="REST port (0: off)")
    parser.add_argument("--model_config_file", default="")
    parser.add_argument("--model_name", default="default")
    parser.add_argument("--model_base_path", default="")
    parser.add_argument("--monitoring_config_file", default="")
    parser.add_argument("--delay_ms", type=float, default=0.0, help="stand-in only: added latency")
    parser.add_argument(
        "--tensor_content",
        action="store_true",
        help="stand-in only: answer gRPC with tensor_content instead of typed *_val fields",
    )
    # Accepted so the real server's command lines work (bare `--enable_batching` too). Batches
    # are not formed; only the batching queue's latency metric is kept, for the dashboards.
    parser.add_argument("--enable_batching", nargs="?", const="true", default="false")
    parser.add_argument("--batching_parameters_file", default="")
    parser.add_argument("--rest_api_timeout_in_ms", type=int, default=30000)
    parser.add_argument(
        "--bind_address",
        default="127.0.0.1",
        help="stand-in only: address both APIs listen on (replicas on 127.0.0.x share a port, "
        "as the pods of a headless Service do)",
    )
    parser.add_argument(
        "--max_concurrent_predicts",
        type=int,
        default=0,
        help="stand-in only: predictions run one batch of this many at a time, the rest wait "
        "(0: no limit); with --delay_ms, a latency-bound replica for balancing benchmarks",
    )
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        parser.error("give --model_config_file or --model_base_path")
    return args


def _config_file(args: argparse.Namespace) -> str:
    if args.model_config_file:
        return args.model_config_file
    handle = tempfile.NamedTemporaryFile("w", suffix=".config", delete=False)
    with handle:
        handle.write(
            "model_config_list { config { "
            f'name: "{args.model_name}" base_path: "{args.model_base_path}" '
            'model_platform: "tensorflow" } }\n'
        )
    return handle.name


def _monitoring_path(path: str) -> str | None:
    if not path:
        return None
    from tests.tfserving_standin.config_schema import MonitoringConfig

    config = text_format.Parse(Path(path).read_text(encoding="utf-8"), MonitoringConfig())
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or "/monitoring/prometheus/metrics"


async def _serve(args: argparse.Namespace) -> None:
    from tests.tfserving_standin.grpc_api import serve_grpc
    from tests.tfserving_standin.metrics import ServingMetrics
    from tests.tfserving_standin.models import ModelRegistry
    from tests.tfserving_standin.rest import RestApi, serve_rest

    log = logging.getLogger("tfserving_standin")
    registry = ModelRegistry.from_file(_config_file(args))
    metrics = ServingMetrics()
    controls = {"delay_ms": args.delay_ms, "predicts": 0}
    # Stand-in only: the W3C trace context of the last Predicts (REST headers, gRPC metadata),
    # so tracing tests see what a backend received (GET /standin/stats).
    received: collections.deque[dict[str, str | None]] = collections.deque(maxlen=100)
    slots = (
        asyncio.Semaphore(args.max_concurrent_predicts) if args.max_concurrent_predicts else None
    )

    batching = args.enable_batching.lower() in ("true", "1")

    def run_queued(enqueued, servable, signature_name, inputs, output_filter):
        if batching:
            # The wait for a free worker thread stands in for TF Serving's batching queue.
            metrics.record_queuing((time.perf_counter() - enqueued) * 1e6)
        return servable.run(signature_name, inputs, output_filter)

    async def run_predict(servable, signature_name, inputs, output_filter):
        controls["predicts"] += 1
        if slots is None:
            return await predict(servable, signature_name, inputs, output_filter)
        async with slots:
            return await predict(servable, signature_name, inputs, output_filter)

    async def predict(servable, signature_name, inputs, output_filter):
        if controls["delay_ms"] > 0:
            await asyncio.sleep(controls["delay_ms"] / 1000)
        # TensorFlow releases the GIL while it runs: a thread keeps both APIs responsive.
        return await asyncio.to_thread(
            run_queued, time.perf_counter(), servable, signature_name, inputs, output_filter
        )

    grpc_server = await serve_grpc(
        registry,
        metrics,
        run_predict,
        args.port,
        tensor_content=args.tensor_content,
        host=args.bind_address,
        received=received,
    )
    log.info("Running gRPC ModelServer at %s:%d ...", args.bind_address, args.port)
    runner = None
    if args.rest_api_port:
        api = RestApi(
            registry,
            metrics,
            run_predict,
            _monitoring_path(args.monitoring_config_file),
            controls,
            received,
        )
        runner = await serve_rest(api, args.rest_api_port, host=args.bind_address)
        log.info("Exporting HTTP/REST API at:%s:%d ...", args.bind_address, args.rest_api_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await grpc_server.stop(grace=0.5)
    if runner is not None:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
