"""NVIDIA Triton Inference Server (the tritonserver that nvidia-pytriton bundles) serving the
`digits` model (see digits_numpy.py) on 127.0.0.1.

    python triton_digits.py WEIGHTS.npz HTTP_PORT GRPC_PORT METRICS_PORT WORKSPACE

Runs inside .venv-triton, never the gateway's venv. Triton runs the model in its Python backend,
whose stub process must load the interpreter's own libpython: the stub bundled for 3.11 links
to ``libpython3.11.so``, found through LD_LIBRARY_PATH, so this script puts the interpreter's
LIBDIR first before Triton starts (tritonserver and its stubs inherit the environment).
"""

from __future__ import annotations

import os
import sys
import sysconfig

import numpy as np
from digits_numpy import load_weights, predict
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main(argv: list[str]) -> int:
    weights_path, http_port, grpc_port, metrics_port, workspace = argv
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = ":".join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p
    )
    weights = load_weights(weights_path)

    @batch
    def infer(pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": predict(weights, pixels)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(http_port),
        grpc_address="127.0.0.1",
        grpc_port=int(grpc_port),
        metrics_port=int(metrics_port),
        allow_metrics=True,
    )
    # The workspace (model store, sockets) under the test's folder, not ~/.cache/pytriton.
    with Triton(config=config, workspace=workspace) as triton:
        triton.bind(
            model_name="digits",
            infer_func=infer,
            inputs=[Tensor(name="pixels", dtype=np.float32, shape=(8, 8))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(10,))],
            config=ModelConfig(max_batch_size=256),
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
