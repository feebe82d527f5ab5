"""GPU benchmark of the twin models (digits, resnet) on both frameworks, ready for a GPU node.

1. The embedded runtimes directly (no HTTP): per model, framework and batch size, after a
   warm-up, latency of one forward pass with the device synchronised (torch.cuda.synchronize;
   TensorFlow's sync_devices) and rows/s; plus the runtime's full call (host <-> device copies).
2. Through the gateway: a `duoserve serve` subprocess with the embedded backend on the same
   device, driven by the bench's load generator (closed loop) from its own process.

Runs on CPU too (``--device cpu`` or no GPU present), e.g. ``--smoke`` for a quick check:

    python bench/gpu_bench.py [--device auto|cuda|cpu] [--models digits,resnet] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from duoserve.config import TensorSpec
from duoserve_bench.cli import make_phase, run_phase
from duoserve_bench.loadgen import LoadGenerator
from duoserve_bench.report import latency_stats, machine_info, summarize
from duoserve_bench.targets import InputSpec, build_request, random_tensors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models.build and tests.servers
STORE = REPO / "models" / "store"
MODELS: dict[str, dict[str, Any]] = {
    "digits": {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
        "range": (0.0, 16.0),
    },
    "resnet": {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 32, 32, 3]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "range": (0.0, 1.0),
    },
}


def pick_devices(wanted: str) -> dict[str, str]:
    """The device each framework will use: cuda when asked (or auto) and visible."""
    import tensorflow as tf
    import torch

    torch_cuda = torch.cuda.is_available()
    tf_cuda = bool(tf.config.list_physical_devices("GPU"))
    if wanted == "cuda" and not (torch_cuda and tf_cuda):
        print(
            f"warning: --device cuda but torch sees CUDA={torch_cuda}, TensorFlow GPUs={tf_cuda}",
            file=sys.stderr,
        )
    if wanted == "cpu":
        return {"pytorch": "cpu", "tensorflow": "cpu"}
    return {
        "pytorch": "cuda" if torch_cuda else "cpu",
        "tensorflow": "cuda" if tf_cuda else "cpu",
    }


def _timed(call: Any, sync: Any, iters: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    sync()
    times = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        call()
        sync()  # the kernels queued by this call have finished
        times[i] = time.perf_counter() - start
    return times


def runtimes_direct(
    model: str, framework: str, device: str, batches: list[int], iters: int, warmup: int
) -> list[dict[str, Any]]:
    from duoserve.backends.embedded import SavedModelRuntime, Signature, TorchScriptRuntime

    spec = MODELS[model]
    inputs = [TensorSpec(**i) for i in spec["inputs"]]
    outputs = [TensorSpec(**o) for o in spec["outputs"]]
    path = STORE / framework / model / "1"
    rows_out = []
    if framework == "pytorch":
        import torch

        runtime: Any = TorchScriptRuntime(path / "model.pt", Signature(inputs, outputs), device)
        module = runtime._module  # the bare forward pass, inputs already on the device

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        def forward_for(x: np.ndarray) -> Any:
            on_device = torch.from_numpy(x).to(device)

            def forward() -> None:
                with torch.inference_mode():
                    module(on_device)

            return forward
    else:
        import tensorflow as tf

        runtime = SavedModelRuntime(path, device)
        fn = runtime._signatures["serving_default"]
        sync_devices = getattr(tf.test.experimental, "sync_devices", None)

        def sync() -> None:
            if device == "cuda" and sync_devices is not None:
                sync_devices()

        def forward_for(x: np.ndarray) -> Any:
            with tf.device(runtime._tf_device):
                on_device = tf.identity(tf.constant(x))

            def forward() -> None:
                with tf.device(runtime._tf_device):
                    fn(**{inputs[0].name: on_device})

            return forward

    for batch in batches:
        tensors = random_tensors(
            [InputSpec(i.name, i.datatype, i.shape) for i in inputs], batch, spec["range"]
        )
        x = tensors[inputs[0].name][1]
        compute = _timed(forward_for(x), sync, iters, warmup)
        full = _timed(lambda x=x: runtime.run({inputs[0].name: x}, []), sync, iters, warmup)
        p50 = float(np.percentile(compute, 50))
        rows_out.append(
            {
                "part": "runtime",
                "model": model,
                "framework": framework,
                "device": device,
                "batch": batch,
                "compute_ms": latency_stats(compute),
                "call_ms": latency_stats(full),
                "rows_per_s": round(batch / p50, 1),
            }
        )
    return rows_out


def through_gateway(
    models: list[str],
    devices: dict[str, str],
    seconds: float,
    levels: list[int],
    batches: list[int],
) -> list[dict[str, Any]]:
    from tests.servers import Gateway

    results: list[dict[str, Any]] = []
    # One gateway per device mix; the embedded backend takes one device for both frameworks,
    # so a framework without CUDA gets its own backend on the CPU.
    backends = {
        f"local-{dev}": {
            "kind": "embedded",
            "model_store": str(STORE),
            "device": dev,
            "max_concurrency": 256,
        }
        for dev in set(devices.values())
    }
    config_models = {}
    for model in models:
        for framework, dev in devices.items():
            config_models[f"{model}-{framework}"] = {
                "inputs": MODELS[model]["inputs"],
                "outputs": MODELS[model]["outputs"],
                "max_batch": 4096,
                "routes": [{"backend": f"local-{dev}", "framework": framework, "model": model}],
            }
    with tempfile.TemporaryDirectory(prefix="duoserve-gpu-bench-") as tmp:
        config = Path(tmp) / "models.yaml"
        config.write_text(yaml.safe_dump({"backends": backends, "models": config_models}))
        gateway = Gateway(config, Path(tmp), env={"DUOSERVE_LOG_LEVEL": "warning"})
        try:
            gateway.start(300)
            assert gateway.proc is not None
            with LoadGenerator(1) as generator:
                for model in models:
                    spec = MODELS[model]
                    inputs = [
                        InputSpec(i["name"], i["datatype"], i["shape"]) for i in spec["inputs"]
                    ]
                    for framework in devices:
                        for batch in batches:
                            payload = random_tensors(inputs, batch, spec["range"])
                            request = build_request(
                                target="gateway",
                                url=gateway.url,
                                model=f"{model}-{framework}",
                                payload=payload,
                                protocol="v2-binary",
                            )
                            for level in levels:
                                phase = make_phase(
                                    request,
                                    mode="closed",
                                    level=level,
                                    warmup_s=min(2.0, seconds),
                                    duration_s=seconds,
                                )
                                samples, cpu = run_phase(
                                    generator, phase, server_pid=gateway.proc.pid
                                )
                                run = summarize(
                                    samples,
                                    window_s=seconds,
                                    meta={
                                        "part": "gateway",
                                        "model": model,
                                        "framework": framework,
                                        "device": devices[framework],
                                        "batch": batch,
                                        "concurrency": level,
                                    },
                                    rows_per_request=batch,
                                    server_cpu_s=cpu,
                                )
                                run.pop("histogram")
                                results.append(run)
        finally:
            gateway.stop()
    return results


def print_tables(runtime_rows: list[dict[str, Any]], gateway_rows: list[dict[str, Any]]) -> None:
    print("\nEmbedded runtimes, direct (device synchronised after every call)")
    print(
        f"{'model':<7} {'framework':<11} {'device':<6} {'batch':>5} {'compute p50 ms':>15} "
        f"{'p99 ms':>8} {'call p50 ms':>12} {'rows/s':>10}"
    )
    for r in runtime_rows:
        print(
            f"{r['model']:<7} {r['framework']:<11} {r['device']:<6} {r['batch']:>5} "
            f"{r['compute_ms']['p50']:>15.3f} {r['compute_ms']['p99']:>8.3f} "
            f"{r['call_ms']['p50']:>12.3f} {r['rows_per_s']:>10.0f}"
        )
    if gateway_rows:
        print("\nThrough the gateway (V2 binary, closed loop)")
        print(
            f"{'model':<7} {'framework':<11} {'device':<6} {'batch':>5} {'conc':>5} "
            f"{'req/s':>8} {'rows/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        )
        for r in gateway_rows:
            print(
                f"{r['model']:<7} {r['framework']:<11} {r['device']:<6} {r['batch']:>5} "
                f"{r['concurrency']:>5} {r['throughput_rps']:>8.1f} {r['rows_per_s']:>9.0f} "
                f"{r['latency_ms']['p50'] or 0:>8.2f} {r['latency_ms']['p99'] or 0:>8.2f} "
                f"{sum(r['errors'].values()):>6}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--models", default="digits,resnet")
    parser.add_argument("--frameworks", default="pytorch,tensorflow")
    parser.add_argument("--batches", default="1,8,64", help="rows per call")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seconds", type=float, default=5.0, help="per gateway run")
    parser.add_argument("--levels", default="1,16", help="gateway closed-loop concurrency")
    parser.add_argument("--smoke", action="store_true", help="tiny run (CPU check)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.smoke:
        args.iters, args.warmup, args.seconds, args.batches, args.levels = 10, 2, 1.0, "1,8", "4"
    models = args.models.split(",")
    frameworks = args.frameworks.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    from models.build import build

    build(STORE, models)
    devices = {f: d for f, d in pick_devices(args.device).items() if f in frameworks}
    print(f"devices: {devices}", file=sys.stderr)
    runtime_rows = []
    for model in models:
        for framework, device in devices.items():
            runtime_rows += runtimes_direct(
                model, framework, device, batches, args.iters, args.warmup
            )
    gateway_rows = (
        through_gateway(
            models, devices, args.seconds, [int(v) for v in args.levels.split(",")], batches
        )
        if args.gateway
        else []
    )
    print_tables(runtime_rows, gateway_rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_info(),
                    "devices": devices,
                    "runtime": runtime_rows,
                    "gateway": gateway_rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
