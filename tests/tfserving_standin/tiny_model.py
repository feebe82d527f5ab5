"""A small SavedModel with the `digits` signature, for tests that must not wait for the real one.

serving_default: `pixels` float32 [-1, 8, 8] -> `probabilities` float32 [-1, 10] (softmax of a
seeded linear layer), so different seeds give versions with different answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


def save_tiny_digits(path: str | Path, *, seed: int = 0) -> Path:
    """Write the SavedModel to ``path`` (e.g. .../digits/2) and return it."""
    rng = np.random.default_rng(seed)
    module = tf.Module()
    module.weights = tf.Variable(rng.normal(size=(64, 10)).astype("float32"))
    module.bias = tf.Variable(rng.normal(size=(10,)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8], tf.float32, name="pixels")])
    def serve(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        flat = tf.reshape(pixels, [-1, 64]) / 16.0
        return {"probabilities": tf.nn.softmax(flat @ module.weights + module.bias)}

    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return Path(path)
