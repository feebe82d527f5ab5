"""Payload translation between the wire formats DuoServe speaks and its own tensor types
(:mod:`duoserve.tensors`), as MLServer keeps its in ``mlserver/codecs/``.

Pure functions only: no I/O, no FastAPI, no backend objects, so a front door and a backend that
speak the same format call the same function.

- :mod:`duoserve.codecs.arrays`: JSON values <-> numpy arrays of a V2 datatype.
- :mod:`duoserve.codecs.v2`: Open Inference Protocol (V2) JSON and the binary tensor extension,
  requests and answers, both directions (the V2 front door, the V2 and TorchServe backends).
- :mod:`duoserve.codecs.torchserve`: the TorchServe handler's named and bare JSON forms.
- :mod:`duoserve.codecs.tfserving`: TF Serving's REST JSON (row and columnar), requests and
  answers both ways, its metadata JSON, and the V2 <-> TensorFlow dtype names.
- :mod:`duoserve.codecs.tensorproto`: TF Serving's gRPC messages (TensorProto, ModelSpec,
  PredictRequest/Response, metadata).

Nothing is imported here, so importing one codec does not load the others (TensorProto loads
protobuf).
"""
