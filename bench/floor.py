"""DuoServe vs a bare FastAPI + aiohttp proxy (bench/bare_proxy.py), both in front of the same
real TorchServe, interleaved in one run: gateway CPU per request and throughput.

    .venv/bin/python bench/floor.py          (or: make bench-floor)
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import REPO, Gateway, TorchServe, free_port, stop_group

work = Path(tempfile.mkdtemp())
ts = TorchServe(
    work, REPO / "models/store/torchserve", {"digits": {"batchSize": 1, "maxBatchDelay": 1}}
)
ts.start()
cfg = work / "models.yaml"
cfg.write_text(
    json.dumps(
        {
            "backends": {
                "ts": {
                    "kind": "torchserve",
                    "url": ts.url,
                    "token_file": str(ts.key_file),
                    "max_concurrency": 64,
                }
            },
            "models": {
                "digits-pytorch": {
                    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
                    "routes": [{"backend": "ts", "framework": "pytorch", "model": "digits"}],
                }
            },
        }
    )
)
gw = Gateway(cfg, work)
gw.start()
port = free_port()
bare = subprocess.Popen(
    [
        str(REPO / ".venv/bin/uvicorn"),
        "bare_proxy:app",
        "--app-dir",
        str(REPO / "bench"),
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--log-level",
        "warning",
        "--no-access-log",
    ],
    env={**os.environ, "UPSTREAM": ts.url, "KEY": ts.inference_key()},
    start_new_session=True,
)
time.sleep(3)


def bench(url, pid, label, conc):
    cmd = [
        str(REPO / ".venv/bin/duoserve"),
        "bench",
        "digits-pytorch",
        "--url",
        url,
        "--concurrency",
        conc,
        "--duration",
        "6",
        "--warmup",
        "1",
        "--no-progress",
        "--gateway-pid",
        str(pid),
        "--label",
        label,
        "--metadata-url",
        gw.url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith(label)]
    print("\n".join(lines) or out.stdout[-800:] + out.stderr[-800:], flush=True)


try:
    for conc in ("1", "8"):
        for _round in range(2):
            bench(gw.url, gw.proc.pid, "duoserve", conc)
            bench(f"http://127.0.0.1:{port}", bare.pid, "bare-proxy", conc)
finally:
    stop_group(bare)
    gw.stop()
    ts.stop()
