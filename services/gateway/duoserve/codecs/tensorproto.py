"""TF Serving's gRPC messages, both ways: TensorProto (raw little-endian ``tensor_content``, or
the typed ``*_val`` fields a server may answer with), ModelSpec, PredictRequest/Response and the
status and metadata calls, in the gateway's own wire-compatible messages
(:mod:`duoserve.protos`, so no TensorFlow is needed)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from duoserve.codecs.tfserving import TF_DTYPES
from duoserve.errors import BadRequest, UpstreamError
from duoserve.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    tensor_pb2,
)
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor, numpy_dtype

DT = tensor_pb2.DataType
# V2 datatype <-> TF DataType
V2_TO_DT: dict[str, tensor_pb2.DataType] = {v2: DT.Value(name) for v2, name in TF_DTYPES.items()}
DT_TO_V2: dict[int, str] = {dt: v2 for v2, dt in V2_TO_DT.items()}

# Which typed field carries each dtype when a server does not use tensor_content.
_TYPED_FIELD: dict[int, str] = {
    DT.DT_FLOAT: "float_val",
    DT.DT_DOUBLE: "double_val",
    DT.DT_INT32: "int_val",
    DT.DT_INT16: "int_val",
    DT.DT_INT8: "int_val",
    DT.DT_UINT8: "int_val",
    DT.DT_UINT16: "int_val",
    DT.DT_INT64: "int64_val",
    DT.DT_UINT32: "uint32_val",
    DT.DT_UINT64: "uint64_val",
    DT.DT_BOOL: "bool_val",
    DT.DT_STRING: "string_val",
    DT.DT_HALF: "half_val",
}


def model_spec(model: str, version: str | None, signature: str | None) -> model_pb2.ModelSpec:
    """The ModelSpec of a call: a numeric version as ``version``, any other as a label."""
    spec = model_pb2.ModelSpec(name=model)
    if version:
        if version.isdigit():
            spec.version.value = int(version)
        else:
            spec.version_label = version
    if signature is not None:
        spec.signature_name = signature
    return spec


def encode_tensor(tensor: Tensor) -> tensor_pb2.TensorProto:
    """A Tensor as TF Serving's TensorProto: raw little-endian bytes, or string_val."""
    dtype = V2_TO_DT.get(tensor.datatype)
    if dtype is None:
        raise BadRequest(f"input '{tensor.name}': TF Serving has no type for {tensor.datatype}")
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.extend(
        tensor_pb2.TensorShapeProto.Dim(size=int(size)) for size in tensor.data.shape
    )
    if dtype == DT.DT_STRING:
        proto.string_val.extend(
            item if isinstance(item, bytes) else str(item).encode("utf-8")
            for item in tensor.data.reshape(-1)
        )
    else:
        array = np.ascontiguousarray(tensor.data, dtype=numpy_dtype(tensor.datatype))
        proto.tensor_content = array.tobytes()
    return proto


def decode_tensor(name: str, proto: tensor_pb2.TensorProto) -> Tensor:
    """A TensorProto (tensor_content or typed values) as a Tensor; UpstreamError if unusable."""
    datatype = DT_TO_V2.get(proto.dtype)
    if datatype is None:
        raise UpstreamError(
            f"output '{name}' has TensorFlow type {DT.Name(proto.dtype)}, "
            "which the gateway cannot return"
        )
    shape = [int(d.size) for d in proto.tensor_shape.dim]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    dtype = numpy_dtype(datatype)
    if proto.tensor_content:
        if datatype == "BYTES":
            raise UpstreamError(f"output '{name}': string tensors cannot use tensor_content")
        data = np.frombuffer(proto.tensor_content, dtype=dtype)
        if data.size != count:
            raise UpstreamError(f"output '{name}': {data.size} values for shape {shape}")
        return Tensor(name, data.reshape(shape), datatype)
    values: Sequence[Any] = getattr(proto, _TYPED_FIELD[proto.dtype])
    if datatype == "BYTES":
        data = np.empty(len(values), dtype=object)
        data[:] = list(values)
    elif datatype == "FP16":
        # half_val carries each float16's 16 bits in an int32.
        data = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        data = np.asarray(values, dtype=dtype)
    if data.size != count:
        # TensorFlow's rule for typed fields: fewer values than elements repeat the last one
        # (a constant tensor may carry one value); none at all means zeros.
        if data.size == 0:
            fill = b"" if datatype == "BYTES" else 0
            data = np.full(count, fill, dtype=dtype)
        elif data.size < count:
            data = np.concatenate([data, np.repeat(data[-1:], count - data.size)])
        else:
            raise UpstreamError(f"output '{name}': {data.size} values for shape {shape}")
    return Tensor(name, data.reshape(shape), datatype)


def predict_request(
    model: str,
    version: str | None,
    signature: str,
    inputs: Iterable[Tensor],
    output_filter: Iterable[str] = (),
) -> predict_pb2.PredictRequest:
    """A PredictRequest: the model spec, the outputs asked for, every input as a TensorProto."""
    message = predict_pb2.PredictRequest(
        model_spec=model_spec(model, version, signature), output_filter=output_filter
    )
    for tensor in inputs:
        message.inputs[tensor.name].CopyFrom(encode_tensor(tensor))
    return message


def decode_predict_response(
    answer: predict_pb2.PredictResponse, request: InferenceRequest, what: str
) -> InferenceResponse:
    """A PredictResponse as the InferenceResponse to ``request``: the outputs it asked for (all,
    when it named none), in its order; the version that answered. ``what`` names the model in
    the UpstreamError of an answer that lacks an output."""
    names = [o.name for o in request.outputs] if request.outputs else list(answer.outputs)
    outputs = []
    for name in names:
        if name not in answer.outputs:
            raise UpstreamError(f"TF Serving's answer for {what} lacks output '{name}'")
        outputs.append(decode_tensor(name, answer.outputs[name]))
    version = (
        str(answer.model_spec.version.value)
        if answer.model_spec.HasField("version")
        else request.version
    )
    return InferenceResponse(
        model_name=request.model, model_version=version, outputs=outputs, id=request.id
    )


def status_request(model: str, version: str | None) -> get_model_status_pb2.GetModelStatusRequest:
    return get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec(model, version, None))


def any_available(answer: get_model_status_pb2.GetModelStatusResponse) -> bool:
    """Whether a GetModelStatus answer lists a version AVAILABLE."""
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return any(s.state == available for s in answer.model_version_status)


def metadata_request(
    model: str, version: str | None
) -> get_model_metadata_pb2.GetModelMetadataRequest:
    return get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=model_spec(model, version, None), metadata_field=["signature_def"]
    )


def _info(dtype: int, shape: tensor_pb2.TensorShapeProto) -> dict[str, Any]:
    return {
        "dtype": DT.Name(dtype) if dtype in DT.values() else str(dtype),
        "shape": None if shape.unknown_rank else [int(d.size) for d in shape.dim],
    }


def decode_metadata(answer: get_model_metadata_pb2.GetModelMetadataResponse) -> dict[str, Any]:
    """A GetModelMetadata answer as ``{"model_spec": {...}, "signature_def": {name: {inputs,
    outputs, method_name}}}`` (the shape :func:`duoserve.codecs.tfserving.decode_metadata`
    gives the REST answer); UpstreamError without signature_def."""
    if "signature_def" not in answer.metadata:
        raise UpstreamError("TF Serving's metadata lacks signature_def")
    # The Any names tensorflow.serving.SignatureDefMap: same bytes as ours, other name.
    signatures = get_model_metadata_pb2.SignatureDefMap.FromString(
        answer.metadata["signature_def"].value
    )
    return {
        "model_spec": {
            "name": answer.model_spec.name,
            "version": str(answer.model_spec.version.value),
        },
        "signature_def": {
            key: {
                "method_name": sig.method_name,
                "inputs": {n: _info(i.dtype, i.tensor_shape) for n, i in sig.inputs.items()},
                "outputs": {n: _info(i.dtype, i.tensor_shape) for n, i in sig.outputs.items()},
            }
            for key, sig in signatures.signature_def.items()
        },
    }
