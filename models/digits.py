"""`digits`: a small CNN for scikit-learn's bundled 8x8 handwritten digits.

Trained in PyTorch, then the same weights are loaded into a Keras twin. Signature: input
`pixels` FP32 [-1, 8, 8] with values 0..16 (the model scales by 1/16 itself), output
`probabilities` FP32 [-1, 10] (softmax).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from models import porting

NAME = "digits"
SIGNATURE: dict[str, Any] = {
    "name": NAME,
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}
SEED = 0
EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 3e-3


class DigitsNet(nn.Module):
    """Two 3x3 conv blocks, then two dense layers; input [n, 8, 8] in 0..16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels / 16.0).unsqueeze(1)
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pixels), dim=1)


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/held-out split: (x_train, x_test, y_train, y_test), x float32 [n, 8, 8]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32)
    labels = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def evaluation_data() -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs and labels used for accuracy and parity."""
    _, x_test, _, y_test = split()
    return x_test, y_test


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """Seeded, single-threaded, deterministic kernels; restores the caller's settings after."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def torch_model() -> DigitsNet:
    """Train the PyTorch model from scratch (a few seconds on one core), in eval mode."""
    x_train, _, y_train, _ = split()
    with deterministic_torch():
        net = DigitsNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        loss_fn = nn.CrossEntropyLoss()
        inputs = torch.from_numpy(x_train)
        targets = torch.from_numpy(y_train)
        # A generator of its own, so shuffling does not depend on any other use of the RNG.
        generator = torch.Generator().manual_seed(SEED)
        net.train()
        for _ in range(EPOCHS):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(order), BATCH_SIZE):
                batch = order[start : start + BATCH_SIZE]
                optimizer.zero_grad()
                loss = loss_fn(net.logits(inputs[batch]), targets[batch])
                loss.backward()
                optimizer.step()
    return net.eval()


def keras_model(net: DigitsNet) -> Any:
    """The Keras twin of a trained DigitsNet, carrying the same weights."""
    import keras
    from keras import layers

    pixels = keras.Input(shape=(8, 8), name="pixels", dtype="float32")
    x = layers.Rescaling(1.0 / 16.0)(pixels)
    x = layers.Reshape((8, 8, 1))(x)
    conv1 = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")
    conv2 = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")
    x = layers.MaxPooling2D(2)(conv1(x))
    x = layers.MaxPooling2D(2)(conv2(x))
    # PyTorch flattens [C, H, W]; Keras holds [H, W, C]. Reorder first so fc1's rows line up.
    x = layers.Permute((3, 1, 2))(x)
    x = layers.Flatten()(x)
    fc1 = layers.Dense(64, activation="relu", name="fc1")
    fc2 = layers.Dense(10, name="fc2")
    probabilities = layers.Softmax(name="probabilities")(fc2(fc1(x)))
    model = keras.Model(pixels, probabilities, name=NAME)

    conv1.set_weights(porting.conv_weights(net.conv1))
    conv2.set_weights(porting.conv_weights(net.conv2))
    fc1.set_weights(porting.dense_weights(net.fc1))
    fc2.set_weights(porting.dense_weights(net.fc2))
    return model
