"""What tracing costs the gateway: CPU per request with tracing off, at 1 % sampling and at
100 %, each gateway in front of the stub backend (bench/stub_backend.py, which costs next to
nothing) and exporting to a local OTLP/HTTP receiver; the three alternated in one run.

    .venv/bin/python bench/tracing_cost.py [--concurrency 1,8] [--rounds 3] [--duration 6]

Requests carry no traceparent, so the gateway's own sampler decides (parentbased_traceidratio
with OTEL_TRACES_SAMPLER_ARG 0.01 or 1.0). Prints each segment's `duoserve bench` line and, per
mode and concurrency, the median gateway CPU ms per request and its difference to "off".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_segment, start_stub_backend  # noqa: E402
from bench.reference import model_yaml  # noqa: E402
from tests.otlp_receiver import OTLPReceiver  # noqa: E402
from tests.servers import Gateway, stop_group, wait_until  # noqa: E402

MODES = {
    "off": {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    "1%": {"OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100%": {"OTEL_TRACES_SAMPLER_ARG": "1.0"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--concurrency", default="1,8", help="levels, e.g. 1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="6", help="seconds per segment")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tracing-cost-"))
    stub, stub_url = start_stub_backend()
    receiver = OTLPReceiver()
    config = work / "models.yaml"
    backend = {"kind": "torchserve", "url": stub_url, "max_concurrency": 64}
    config.write_text(model_yaml("digits", {"ts": backend}, {"digits-pytorch": ("ts", "pytorch")}))
    common = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_SERVICE_NAME": "duoserve-bench",
    }
    gateways = {mode: Gateway(config, work, {**common, **extra}) for mode, extra in MODES.items()}
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        wait_until(lambda: stub.poll() is None, 5, "the stub backend", stub)
        for gateway in gateways.values():
            gateway.start()
        for conc in args.concurrency.split(","):
            for _ in range(args.rounds):
                for mode, gateway in gateways.items():
                    assert gateway.proc is not None
                    value = bench_segment(
                        gateway.url,
                        gateway.proc.pid,
                        f"tracing-{mode}",
                        conc,
                        args.duration,
                        gateway.url,
                    )
                    if value is not None:
                        cpu.setdefault((mode, conc), []).append(value)
    finally:
        for gateway in gateways.values():
            gateway.stop()
        stop_group(stub)
        receiver.close()
    print(f"\nspans received by the OTLP receiver: {len(receiver.snapshot())}")
    print("| concurrency | tracing | gateway CPU ms/req (median) | added vs off |")
    print("| --- | --- | --- | --- |")
    for conc in args.concurrency.split(","):
        off = statistics.median(cpu.get(("off", conc)) or [float("nan")])
        for mode in MODES:
            values = cpu.get((mode, conc))
            if not values:
                continue
            median = statistics.median(values)
            print(f"| {conc} | {mode} | {median:.3f} | {median - off:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
