"""A stand-in for TensorFlow Serving, for tests on machines without its binary.

It serves real SavedModels with TensorFlow and speaks TF Serving's REST (8501-style) and gRPC
(8500-style) APIs with the official tensorflow-serving-api messages. Start it with
``python -m tests.tfserving_standin --model_config_file=... --port=N --rest_api_port=M``, or
from a test with :func:`tests.tfserving_standin.fixture.start_standin`.
"""
