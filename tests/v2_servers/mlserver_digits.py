"""A custom MLServer runtime serving the `digits` model (see digits_numpy.py).

MLServer imports it by its ``implementation`` in model-settings.json; ``parameters.uri`` is the
weights file the tests export from models/store. Runs inside .venv-mlserver, never the gateway's.
"""

from __future__ import annotations

import numpy as np
from digits_numpy import load_weights, predict
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse


class DigitsRuntime(MLModel):
    """Input ``pixels`` FP32 [n, 8, 8] in 0..16; output ``probabilities`` FP32 [n, 10]."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise InferenceError("model-settings.json needs parameters.uri (the weights file)")
        self._weights = load_weights(uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {tensor.name: tensor for tensor in payload.inputs}
        if "pixels" not in inputs:
            raise InferenceError(f"unknown inputs {sorted(inputs)}; the model takes 'pixels'")
        pixels = NumpyCodec.decode_input(inputs["pixels"])
        if pixels.dtype != np.float32:
            raise InferenceError(f"pixels must be FP32, not {inputs['pixels'].datatype}")
        try:
            probabilities = predict(self._weights, pixels)
        except ValueError as error:
            raise InferenceError(str(error)) from None
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("probabilities", probabilities)],
        )
