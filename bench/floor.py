"""DuoServe vs a bare FastAPI + aiohttp proxy (bench/bare_proxy.py), both in front of the same
backend, alternated in one run: gateway CPU per request, throughput and latency.

    .venv/bin/python bench/floor.py --backend stub         (what each proxy itself costs)
    .venv/bin/python bench/floor.py --backend torchserve   (both sharing the CPUs with TorchServe)
    make bench-floor                                       (both, one after the other)

The stub backend (bench/stub_backend.py) answers at once and costs next to nothing, so the
proxies' own CPU per request is measured without a model server competing for the two cores.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, bench_segment, start_stub_backend  # noqa: E402
from bench.reference import model_yaml  # noqa: E402
from tests.servers import (  # noqa: E402
    Gateway,
    TorchServe,
    free_port,
    http_get,
    stop_group,
    wait_until,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["stub", "torchserve"], default="stub")
    parser.add_argument("--concurrency", default="1,8", help="levels, e.g. 1,8,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", default="6", help="seconds per segment")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    stub = ts = None
    if args.backend == "stub":
        stub, upstream = start_stub_backend()
        key = "unused"
        backend: dict[str, object] = {"kind": "torchserve", "url": upstream}
    else:
        ts = TorchServe(
            work, REPO / "models/store/torchserve", {"digits": {"batchSize": 1, "maxBatchDelay": 1}}
        )
        ts.start()
        upstream, key = ts.url, ts.inference_key()
        backend = {"kind": "torchserve", "url": upstream, "token_file": str(ts.key_file)}
    config = work / "models.yaml"
    config.write_text(
        model_yaml(
            "digits",
            {"ts": {**backend, "max_concurrency": 64}},
            {"digits-pytorch": ("ts", "pytorch")},
        )
    )
    gateway = Gateway(config, work)
    bare = None
    try:
        gateway.start()
        assert gateway.proc is not None
        bare_port = free_port()
        bare = subprocess.Popen(
            [
                str(REPO / ".venv/bin/uvicorn"),
                "bare_proxy:app",
                "--app-dir",
                str(REPO / "bench"),
                "--port",
                str(bare_port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env={**os.environ, "UPSTREAM": upstream, "KEY": key},
            start_new_session=True,
        )
        bare_url = f"http://127.0.0.1:{bare_port}"
        wait_until(lambda: http_get(bare_url + "/docs")[0] == 200, 30, "the bare proxy", bare)
        print(f"backend: {args.backend}", flush=True)
        for conc in args.concurrency.split(","):
            for _ in range(args.rounds):
                bench_segment(
                    gateway.url, gateway.proc.pid, "duoserve", conc, args.duration, gateway.url
                )
                bench_segment(bare_url, bare.pid, "bare-proxy", conc, args.duration, gateway.url)
    finally:
        if bare is not None:
            stop_group(bare)
        gateway.stop()
        if ts is not None:
            ts.stop()
        if stub is not None:
            stop_group(stub)


if __name__ == "__main__":
    main()
