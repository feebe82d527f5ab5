"""`duoserve bench`: load generator for the gateway or a backend directly.

Closed loop (``--concurrency 1,8,32``: that many users, each sending as soon as its previous
answer came back) or open loop (``--rate 200,400``: constant arrivals; latency measured from
each request's intended send time, so queueing cannot hide). The load comes from worker
processes of its own (``--processes``), never from the measured server's process.

Examples::

    duoserve bench --url http://127.0.0.1:8000 --model digits --framework pytorch \\
        --concurrency 1,8,32 --duration 10 --json out.json --plots plots/
    duoserve bench --target torchserve --url http://127.0.0.1:8080 --model digits \\
        --token-file key_file.json --input pixels:FP32:8x8 --range 0,16 --rate 100
    duoserve bench --target tfserving-grpc --url 127.0.0.1:8500 --model digits \\
        --payload body.json --requests 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from duoserve_bench.loadgen import LoadGenerator, Phase, Samples
from duoserve_bench.report import (
    format_table,
    machine_info,
    process_cpu_seconds,
    summarize,
    write_plots,
)
from duoserve_bench.targets import (
    PROTOCOLS,
    TARGETS,
    RequestSpec,
    build_request,
    fetch_signature,
    load_payload,
    parse_input_option,
    random_tensors,
    read_token,
)


class ProgressBar:
    """A one-line bar on stderr (only when it is a terminal, unless forced)."""

    def __init__(self, enabled: bool | None = None, width: int = 30) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.width = width
        self.started = 0.0
        self.total_s = 0.0
        self.text = ""

    def start(self, text: str, total_s: float | None) -> None:
        self.started = time.monotonic()
        self.total_s = total_s or 0.0
        self.text = text

    def update(self, completed: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        if self.total_s > 0:
            frac = min(1.0, elapsed / self.total_s)
            bar = "#" * int(frac * self.width)
            shown = f"[{bar:<{self.width}}] {frac * 100:3.0f}%"
        else:
            shown = f"[{elapsed:6.1f} s]"
        sys.stderr.write(f"\r{shown} {self.text} {completed} req ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (self.width + len(self.text) + 40) + "\r")
            sys.stderr.flush()


def make_phase(
    spec: RequestSpec,
    *,
    mode: str,
    level: float,
    warmup_s: float,
    duration_s: float | None,
    requests: int | None = None,
    timeout_s: float = 30.0,
    max_in_flight: int = 4096,
) -> Phase:
    return Phase(
        spec=spec,
        mode=mode,
        concurrency=int(level) if mode == "closed" else 1,
        rate=float(level) if mode == "open" else 0.0,
        warmup_s=warmup_s,
        duration_s=duration_s,
        requests=requests,
        timeout_s=timeout_s,
        max_in_flight=max_in_flight,
    )


def run_phase(
    generator: LoadGenerator,
    phase: Phase,
    *,
    server_pid: int | None = None,
    progress: ProgressBar | None = None,
    label: str = "",
) -> tuple[Samples, float | None]:
    """Run one phase; (samples, CPU seconds the server process tree used while measured)."""
    cpu: list[float] = []

    def at_start() -> None:
        if server_pid is not None:
            cpu.append(process_cpu_seconds(server_pid))

    def tick() -> None:
        if progress is not None:
            progress.update(generator.completed())

    if progress is not None:
        total = phase.warmup_s + phase.duration_s + 0.2 if phase.duration_s is not None else None
        progress.start(label, total)
    samples, _ = generator.run(phase, at_start=at_start, while_waiting=tick)
    if server_pid is not None:
        cpu.append(process_cpu_seconds(server_pid))
    if progress is not None:
        progress.finish()
    return samples, (cpu[1] - cpu[0]) if len(cpu) == 2 else None


def run_meta(phase: Phase, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "mode": phase.mode,
        "concurrency": phase.concurrency if phase.mode == "closed" else None,
        "rate": phase.rate if phase.mode == "open" else None,
        "warmup_s": phase.warmup_s,
        **(meta or {}),
    }


def measure(
    generator: LoadGenerator,
    spec: RequestSpec,
    *,
    mode: str,
    level: float,
    warmup_s: float,
    duration_s: float | None,
    requests: int | None = None,
    timeout_s: float = 30.0,
    max_in_flight: int = 4096,
    server_pid: int | None = None,
    meta: dict[str, Any] | None = None,
    progress: ProgressBar | None = None,
) -> dict[str, Any]:
    """One run at one load level; the summary dict (see report.summarize)."""
    phase = make_phase(
        spec,
        mode=mode,
        level=level,
        warmup_s=warmup_s,
        duration_s=duration_s,
        requests=requests,
        timeout_s=timeout_s,
        max_in_flight=max_in_flight,
    )
    samples, cpu_s = run_phase(
        generator,
        phase,
        server_pid=server_pid,
        progress=progress,
        label=(meta or {}).get("label", ""),
    )
    return summarize(
        samples,
        window_s=duration_s if requests is None else None,
        meta=run_meta(phase, meta),
        rows_per_request=spec.rows,
        server_cpu_s=cpu_s,
    )


def _levels(text: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("load levels must be positive")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duoserve bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[-1] if __doc__ else None,
    )
    where = parser.add_argument_group("target")
    # Positional too: `duoserve bench digits --url ...` gets through the top-level parser, which
    # passes on only what follows a first positional argument.
    where.add_argument("model_pos", nargs="?", metavar="MODEL", help="model name (or --model)")
    where.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (gRPC: host:port)")
    where.add_argument("--model", help="model name on the target")
    where.add_argument(
        "--target",
        choices=TARGETS,
        default="gateway",
        help="gateway (default), a V2 server, or a backend directly",
    )
    where.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="v2",
        help="front door to use on the gateway / a V2 server (default v2 JSON)",
    )
    where.add_argument("--framework", help="pin a framework on the gateway (x-duoserve-framework)")
    where.add_argument("--token-file", help="TorchServe key_file.json or a file with the key")
    where.add_argument("--signature-name", default="serving_default", help="TF Serving gRPC")
    where.add_argument("--header", action="append", default=[], help="extra 'Name: value'")

    data = parser.add_argument_group("payload")
    data.add_argument("--payload", type=Path, help="request body file (a V2 body is re-encoded)")
    data.add_argument("--input", action="append", default=[], help="name:DATATYPE:8x8 (no batch)")
    data.add_argument("--metadata-url", help="V2 server to read the signature from")
    data.add_argument("--batch", type=int, default=1, help="rows per request (generated payload)")
    data.add_argument("--range", help="value range lo,hi of generated data (default 0,1)")
    data.add_argument("--seed", type=int, default=0)

    load = parser.add_argument_group("load")
    levels = load.add_mutually_exclusive_group()
    levels.add_argument("--concurrency", type=lambda t: _levels(t, int), help="closed loop: 1,8,32")
    levels.add_argument("--rate", type=lambda t: _levels(t, float), help="open loop: req/s list")
    load.add_argument("--warmup", type=float, default=2.0, help="seconds, not measured")
    stop = load.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, help="seconds measured per level (default 10)")
    stop.add_argument("--requests", type=int, help="requests measured per level")
    load.add_argument("--processes", type=int, default=1, help="load generator processes")
    load.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    load.add_argument("--max-in-flight", type=int, default=4096, help="open loop cap")

    out = parser.add_argument_group("output")
    out.add_argument("--gateway-pid", type=int, help="report this process's CPU per request")
    out.add_argument("--label", help="series name in tables and plots")
    out.add_argument("--json", type=Path, help="write the results here")
    out.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _payload(args: argparse.Namespace) -> Any:
    if args.payload is not None:
        return load_payload(args.payload)
    if args.input:
        inputs = [parse_input_option(text) for text in args.input]
    else:
        source = args.metadata_url or (args.url if args.target in ("gateway", "v2") else None)
        if source is None:
            raise ValueError(
                f"target {args.target} has no V2 metadata: give --payload, --input or "
                "--metadata-url (e.g. the gateway's URL)"
            )
        inputs = fetch_signature(source, args.model)
    value_range = None
    if args.range:
        lo, hi = (float(v) for v in args.range.split(","))
        value_range = (lo, hi)
    return random_tensors(inputs, args.batch, value_range, args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model = args.model or args.model_pos
    if not args.model:
        parser.error("give the model: `duoserve bench MODEL ...` or --model")
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    extra = {}
    for text in args.header:
        name, _, value = text.partition(":")
        extra[name.strip()] = value.strip()
    try:
        payload = _payload(args)
        token = read_token(args.token_file) if args.token_file else None
        spec = build_request(
            target=args.target,
            url=args.url,
            model=args.model,
            payload=payload,
            protocol=args.protocol,
            framework=args.framework,
            token=token,
            signature=args.signature_name,
            extra_headers=extra,
        )
    except (ValueError, RuntimeError, OSError) as error:
        print(f"duoserve bench: {error}", file=sys.stderr)
        return 2
    mode, levels = ("open", args.rate) if args.rate else ("closed", args.concurrency or [1])
    label = args.label or ":".join(
        p
        for p in (
            args.target,
            args.protocol if args.target in ("gateway", "v2") else "",
            args.model,
            args.framework or "",
        )
        if p
    )
    meta = {
        "label": label,
        "target": args.target,
        "protocol": args.protocol if args.target in ("gateway", "v2") else args.target,
        "model": args.model,
        "framework": args.framework,
        "url": args.url,
    }
    progress = ProgressBar(False if args.no_progress else None)
    runs = []
    with LoadGenerator(max(1, args.processes)) as generator:
        for level in levels:
            run = measure(
                generator,
                spec,
                mode=mode,
                level=level,
                warmup_s=args.warmup,
                duration_s=args.duration,
                requests=args.requests,
                timeout_s=args.timeout,
                max_in_flight=args.max_in_flight,
                server_pid=args.gateway_pid,
                meta=meta,
                progress=progress,
            )
            runs.append(run)
            if not progress.enabled:
                print(
                    f"{label} {mode} {level}: {run['ok']} ok, "
                    f"{run['throughput_rps']:.1f} req/s, p99 {run['latency_ms']['p99']} ms",
                    file=sys.stderr,
                )
    print(format_table(runs))
    result = {
        "tool": "duoserve bench",
        "machine": machine_info(),
        "request": spec.description,
        "load_generator_processes": args.processes,
        "runs": runs,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.plots:
        for path in write_plots(runs, args.plots, title=f"({args.model})"):
            print(f"wrote {path}", file=sys.stderr)
    failed = sum(run["ok"] == 0 for run in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
