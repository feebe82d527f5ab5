"""The `digits` CNN (models/digits.py) computed with numpy alone, from its trained weights.

The real V2 servers (MLServer, Triton) run in virtual environments of their own, without
torch: they serve the digits model through this forward pass, over the weights the tests export
from models/store's TorchScript (``export_weights``). Same weights, same layers, so their
answers match the embedded PyTorch runtime's to float rounding: what a test compares is the real
model's output, not a made-up function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYERS = ("conv1", "conv2", "fc1", "fc2")


def export_weights(torchscript: Path, out: Path) -> Path:
    """Write the TorchScript model's weights to ``out`` (.npz); needs torch (the tests' venv)."""
    import torch

    state = torch.jit.load(str(torchscript), map_location="cpu").state_dict()
    np.savez(out, **{name: value.numpy() for name, value in state.items()})
    return out


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        weights = {name: npz[name].astype(np.float32) for name in npz.files}
    missing = [f"{layer}.weight" for layer in LAYERS if f"{layer}.weight" not in weights]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return weights


def _conv3x3_same(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv2d(kernel 3, padding 1) on [n, c, h, w]: the nine shifted windows summed."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, weight.shape[0], h, w), dtype=np.float32)
    for i in range(3):
        for j in range(3):
            window = padded[:, :, i : i + h, j : j + w]
            out += np.einsum("nchw,oc->nohw", window, weight[:, :, i, j])
    return out + bias[None, :, None, None]


def _pool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def predict(weights: dict[str, np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """Probabilities [n, 10] of images [n, 8, 8] with values 0..16."""
    if pixels.ndim != 3 or pixels.shape[1:] != (8, 8):
        raise ValueError(f"pixels must have shape [n, 8, 8], not {list(pixels.shape)}")
    x = (pixels.astype(np.float32) / 16.0)[:, None, :, :]
    x = _pool2(np.maximum(_conv3x3_same(x, weights["conv1.weight"], weights["conv1.bias"]), 0))
    x = _pool2(np.maximum(_conv3x3_same(x, weights["conv2.weight"], weights["conv2.bias"]), 0))
    x = x.reshape(len(x), -1)
    x = np.maximum(x @ weights["fc1.weight"].T + weights["fc1.bias"], 0)
    logits = x @ weights["fc2.weight"].T + weights["fc2.bias"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
