"""TensorFlow Serving as a backend, over gRPC (PredictionService, raw tensor bytes) or its REST
API.

- :mod:`.backend`: ``TFServingBackend``, what ``kind: tfserving`` builds; its replicas, and which
  API reaches them.
- :mod:`.grpc_api`: the gRPC API (port 8500, the default) on one replica: a long-lived channel,
  every input a TensorProto with ``tensor_content``, using the gateway's own wire-compatible
  messages (:mod:`duoserve.protos`), so no TensorFlow is needed.
- :mod:`.rest_api`: the REST API (port 8501) on one replica: the columnar ``{"inputs": {...}}``
  JSON on its pooled HTTP connections, output names learnt from the model's metadata.
- :mod:`.errors`: both APIs' failures as the gateway's errors, and TF Serving's error text
  cleaned of internals.

The payloads themselves are :mod:`duoserve.codecs.tensorproto` and
:mod:`duoserve.codecs.tfserving`.
"""

from duoserve.backends.tfserving.backend import TFServingBackend

__all__ = ["TFServingBackend"]
