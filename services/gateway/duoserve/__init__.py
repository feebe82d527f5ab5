"""DuoServe: one REST front door for PyTorch and TensorFlow models."""

__version__ = "0.1.0"
