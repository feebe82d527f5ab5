"""Frontends: one module per client protocol (decode -> InferenceRequest, encode <- response)."""
