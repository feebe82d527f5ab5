"""Copy PyTorch weights into Keras layers, and fingerprint weights.

PyTorch stores tensors channels-first ([out, in, kh, kw] kernels, [out, in] dense matrices);
Keras stores them channels-last ([kh, kw, in, out], [in, out]). These functions do the
transposes so a twin computes the same function in both frameworks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def conv_weights(conv: nn.Conv2d) -> list[np.ndarray]:
    """Keras Conv2D weights ([kh, kw, in, out] kernel, then bias if any) of a torch Conv2d."""
    weights = [_np(conv.weight).transpose(2, 3, 1, 0)]
    if conv.bias is not None:
        weights.append(_np(conv.bias))
    return weights


def dense_weights(linear: nn.Linear) -> list[np.ndarray]:
    """Keras Dense weights ([in, out] kernel, bias) of a torch Linear."""
    weights = [_np(linear.weight).T]
    if linear.bias is not None:
        weights.append(_np(linear.bias))
    return weights


def batchnorm_weights(norm: nn.BatchNorm2d) -> list[np.ndarray]:
    """Keras BatchNormalization weights (gamma, beta, moving mean, moving variance)."""
    assert norm.running_mean is not None and norm.running_var is not None
    return [_np(norm.weight), _np(norm.bias), _np(norm.running_mean), _np(norm.running_var)]


def weights_sha256(named_arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """A digest of weights that ignores file-format noise (zip timestamps, op names).

    Two trainings that end with bit-identical weights get the same digest; any change to a
    value, a shape, a dtype or a name changes it.
    """
    digest = hashlib.sha256()
    for name, array in sorted(named_arrays, key=lambda item: item[0]):
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{name}|{contiguous.dtype.str}|{contiguous.shape}\n".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def torch_weights_sha256(module: nn.Module) -> str:
    """Weights digest of a torch module's state dict (parameters and buffers)."""
    return weights_sha256((name, _np(t)) for name, t in module.state_dict().items())


def keras_weights_sha256(model: object) -> str:
    """Weights digest of a Keras model, by variable path (layer/weight)."""
    variables = model.weights  # type: ignore[attr-defined]
    return weights_sha256((v.path, np.asarray(v.numpy())) for v in variables)
