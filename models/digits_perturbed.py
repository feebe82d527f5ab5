"""`digits-perturbed`: the `digits` twin with its last layer's weights nudged, so that it
disagrees with `digits` on a few percent of inputs (3.1 % of the held-out split: 14 of 450),
for rollout tests and demos: a rollout to it must stop before any user sees its answers.

Same signature, same framework pair (TorchScript, SavedModel, TorchServe archive); the nudge is
seeded, so builds stay bit-identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models import digits

NAME = "digits-perturbed"
SIGNATURE: dict[str, Any] = {**digits.SIGNATURE, "name": NAME}
NUDGE_SEED = 7
NUDGE_SCALE = 1.0
"""Gaussian noise added to fc2, times the mean magnitude of each of its tensors."""


def torch_model() -> digits.DigitsNet:
    net = digits.torch_model()
    generator = torch.Generator().manual_seed(NUDGE_SEED)
    with torch.no_grad():
        for tensor in (net.fc2.weight, net.fc2.bias):
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.add_(noise * NUDGE_SCALE * tensor.abs().mean())
    return net


def keras_model(net: digits.DigitsNet) -> Any:
    return digits.keras_model(net)


def evaluation_data() -> tuple[np.ndarray, np.ndarray]:
    return digits.evaluation_data()
