"""Example twin models: each defined once in PyTorch and once in TensorFlow with identical weights.

Build every artifact (TorchScript, SavedModel, TorchServe archive, manifest) with
``python -m models.build --store models/store`` from the repository root.
"""
