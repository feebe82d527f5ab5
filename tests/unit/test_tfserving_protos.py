"""The gateway's own TF Serving messages are wire-compatible with the official ones.

Messages built with tensorflow-serving-api's protos must parse with duoserve.protos to the
same content, and the other way round; the TF Serving config files in services/tfserving must
parse with TF Serving's config messages.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from duoserve.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    tensor_pb2,
)

official_predict = importlib.import_module("tensorflow_serving.apis.predict_pb2")
official_metadata = importlib.import_module("tensorflow_serving.apis.get_model_metadata_pb2")
official_status = importlib.import_module("tensorflow_serving.apis.get_model_status_pb2")
official_server_config = importlib.import_module(
    "tensorflow_serving.config.model_server_config_pb2"
)
official_types = importlib.import_module("tensorflow.core.framework.types_pb2")
official_meta_graph = importlib.import_module("tensorflow.core.protobuf.meta_graph_pb2")
official_tensor = importlib.import_module("tensorflow.core.framework.tensor_pb2")

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "services" / "tfserving"


def _roundtrip(message, target_cls):
    """Serialize with one definition, parse with the other, and back again."""
    other = target_cls.FromString(message.SerializeToString())
    back = type(message).FromString(other.SerializeToString())
    assert back == message
    return other


def _official_request():
    request = official_predict.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.version.value = 3
    request.model_spec.signature_name = "serving_default"
    pixels = np.arange(2 * 8 * 8, dtype="<f4").reshape(2, 8, 8) / 7
    tensor = request.inputs["pixels"]
    tensor.dtype = official_types.DT_FLOAT
    tensor.tensor_shape.dim.add(size=2)
    tensor.tensor_shape.dim.add(size=8)
    tensor.tensor_shape.dim.add(size=8)
    tensor.tensor_content = pixels.tobytes()
    words = request.inputs["words"]
    words.dtype = official_types.DT_STRING
    words.tensor_shape.dim.add(size=2)
    words.string_val.extend([b"caf\xc3\xa9", b"\x00\xff"])
    request.output_filter.extend(["probabilities", "logits"])
    return request, pixels


def test_predict_request_official_to_ours_keeps_every_field() -> None:
    request, pixels = _official_request()
    ours = _roundtrip(request, predict_pb2.PredictRequest)

    assert ours.model_spec.name == "digits"
    assert ours.model_spec.WhichOneof("version_choice") == "version"
    assert ours.model_spec.version.value == 3
    assert ours.model_spec.signature_name == "serving_default"
    assert list(ours.output_filter) == ["probabilities", "logits"]
    tensor = ours.inputs["pixels"]
    assert tensor.dtype == tensor_pb2.DT_FLOAT
    assert [d.size for d in tensor.tensor_shape.dim] == [2, 8, 8]
    decoded = np.frombuffer(tensor.tensor_content, dtype="<f4").reshape(2, 8, 8)
    np.testing.assert_array_equal(decoded, pixels)
    assert ours.inputs["words"].dtype == tensor_pb2.DT_STRING
    assert list(ours.inputs["words"].string_val) == [b"caf\xc3\xa9", b"\x00\xff"]


def test_predict_request_ours_to_official_with_version_label() -> None:
    ours = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="digits", version_label="stable"),
        output_filter=["probabilities"],
    )
    tensor = ours.inputs["ids"]
    tensor.dtype = tensor_pb2.DT_INT64
    tensor.tensor_shape.dim.add(size=3)
    tensor.int64_val.extend([-(2**40), 0, 2**62])

    official = _roundtrip(ours, official_predict.PredictRequest)

    assert official.model_spec.WhichOneof("version_choice") == "version_label"
    assert official.model_spec.version_label == "stable"
    assert not official.model_spec.HasField("version")
    assert official.inputs["ids"].dtype == official_types.DT_INT64
    assert list(official.inputs["ids"].int64_val) == [-(2**40), 0, 2**62]


def test_predict_response_typed_values_decode_alike() -> None:
    """TF Serving answers with typed *_val fields by default (AsProtoField)."""
    response = official_predict.PredictResponse()
    response.model_spec.name = "digits"
    response.model_spec.version.value = 1
    response.model_spec.signature_name = "serving_default"
    probabilities = response.outputs["probabilities"]
    probabilities.dtype = official_types.DT_FLOAT
    probabilities.tensor_shape.dim.add(size=1)
    probabilities.tensor_shape.dim.add(size=3)
    probabilities.float_val.extend([0.25, 0.5, 0.25])
    half = response.outputs["half"]
    half.dtype = official_types.DT_HALF
    half.tensor_shape.dim.add(size=2)
    half_values = np.array([1.5, -0.125], dtype=np.float16)
    half.half_val.extend(int(v) for v in half_values.view(np.uint16))
    flags = response.outputs["flags"]
    flags.dtype = official_types.DT_BOOL
    flags.tensor_shape.dim.add(size=2)
    flags.bool_val.extend([True, False])
    small = response.outputs["small"]
    small.dtype = official_types.DT_UINT8
    small.tensor_shape.dim.add(size=2)
    small.int_val.extend([0, 255])
    big = response.outputs["big"]
    big.dtype = official_types.DT_UINT64
    big.tensor_shape.dim.add(size=1)
    big.uint64_val.append(2**64 - 1)
    doubles = response.outputs["doubles"]
    doubles.dtype = official_types.DT_DOUBLE
    doubles.double_val.append(1e-300)

    ours = _roundtrip(response, predict_pb2.PredictResponse)

    assert ours.model_spec.version.value == 1
    assert list(ours.outputs["probabilities"].float_val) == [0.25, 0.5, 0.25]
    bits = np.array(ours.outputs["half"].half_val, dtype=np.uint16)
    np.testing.assert_array_equal(bits.view(np.float16), half_values)
    assert list(ours.outputs["flags"].bool_val) == [True, False]
    assert list(ours.outputs["small"].int_val) == [0, 255]
    assert list(ours.outputs["big"].uint64_val) == [2**64 - 1]
    assert list(ours.outputs["doubles"].double_val) == [1e-300]
    assert len(ours.outputs["doubles"].tensor_shape.dim) == 0  # a scalar


def test_datatype_enum_values_match_tensorflow() -> None:
    for value in tensor_pb2.DataType.DESCRIPTOR.values:
        assert official_types.DataType.Value(value.name) == value.number


def test_model_metadata_any_decodes_with_our_signature_def_map() -> None:
    signature = official_meta_graph.SignatureDef(method_name="tensorflow/serving/predict")
    pixels = signature.inputs["pixels"]
    pixels.name = "serving_default_pixels:0"
    pixels.dtype = official_types.DT_FLOAT
    for size in (-1, 8, 8):
        pixels.tensor_shape.dim.add(size=size)
    out = signature.outputs["probabilities"]
    out.name = "StatefulPartitionedCall:0"
    out.dtype = official_types.DT_FLOAT
    out.tensor_shape.dim.add(size=-1)
    out.tensor_shape.dim.add(size=10)
    signature_map = official_metadata.SignatureDefMap()
    signature_map.signature_def["serving_default"].CopyFrom(signature)
    response = official_metadata.GetModelMetadataResponse()
    response.model_spec.name = "digits"
    response.model_spec.version.value = 1
    response.metadata["signature_def"].Pack(signature_map)

    ours = _roundtrip(response, get_model_metadata_pb2.GetModelMetadataResponse)

    packed = ours.metadata["signature_def"]
    assert packed.type_url.endswith("/tensorflow.serving.SignatureDefMap")
    decoded = get_model_metadata_pb2.SignatureDefMap.FromString(packed.value)
    serving = decoded.signature_def["serving_default"]
    assert serving.method_name == "tensorflow/serving/predict"
    assert serving.inputs["pixels"].name == "serving_default_pixels:0"
    assert serving.inputs["pixels"].dtype == tensor_pb2.DT_FLOAT
    assert [d.size for d in serving.inputs["pixels"].tensor_shape.dim] == [-1, 8, 8]
    assert [d.size for d in serving.outputs["probabilities"].tensor_shape.dim] == [-1, 10]


def test_model_metadata_request_ours_to_official() -> None:
    ours = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=model_pb2.ModelSpec(name="digits"), metadata_field=["signature_def"]
    )
    official = _roundtrip(ours, official_metadata.GetModelMetadataRequest)
    assert official.model_spec.name == "digits"
    assert list(official.metadata_field) == ["signature_def"]


def test_model_status_both_ways() -> None:
    response = official_status.GetModelStatusResponse()
    available = response.model_version_status.add(version=2)
    available.state = official_status.ModelVersionStatus.AVAILABLE
    failed = response.model_version_status.add(version=1)
    failed.state = official_status.ModelVersionStatus.END
    failed.status.error_code = 5  # NOT_FOUND
    failed.status.error_message = "model files gone"

    ours = _roundtrip(response, get_model_status_pb2.GetModelStatusResponse)

    first, second = ours.model_version_status
    assert (first.version, first.state) == (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    assert second.state == get_model_status_pb2.ModelVersionStatus.END
    assert second.status.error_code == get_model_status_pb2.NOT_FOUND
    assert second.status.error_message == "model files gone"

    request = get_model_status_pb2.GetModelStatusRequest(
        model_spec=model_pb2.ModelSpec(name="digits", version_label="canary")
    )
    official_request = _roundtrip(request, official_status.GetModelStatusRequest)
    assert official_request.model_spec.version_label == "canary"


def test_models_config_parses_with_tf_serving_config_proto() -> None:
    config = text_format.Parse(
        (CONFIG_DIR / "models.config").read_text(), official_server_config.ModelServerConfig()
    )
    models = {m.name: m for m in config.model_config_list.config}
    digits = models["digits"]
    assert digits.base_path == "/models/digits"
    assert digits.model_platform == "tensorflow"
    assert digits.model_version_policy.WhichOneof("policy_choice") is not None
    assert dict(digits.version_labels)["stable"] == 1


def test_batching_and_monitoring_config_parse_with_tf_serving_messages() -> None:
    from tests.tfserving_standin.config_schema import BatchingParameters, MonitoringConfig

    batching = text_format.Parse((CONFIG_DIR / "batching.config").read_text(), BatchingParameters())
    assert batching.max_batch_size.value >= 1
    assert batching.num_batch_threads.value >= 1
    sizes = list(batching.allowed_batch_sizes)
    # TF Serving refuses allowed_batch_sizes that are not increasing or do not end at the max.
    assert sizes == sorted(sizes) and sizes[-1] == batching.max_batch_size.value

    monitoring = text_format.Parse(
        (CONFIG_DIR / "monitoring.config").read_text(), MonitoringConfig()
    )
    assert monitoring.prometheus_config.enable is True
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


CODEC_CASES = [
    ("FP32", np.array([[0.5, -1.25], [3.0e38, 1e-38]], dtype=np.float32)),
    ("FP64", np.array([1e-300, -2.5], dtype=np.float64)),
    ("FP16", np.array([[1.5, -0.125, 65504.0]], dtype=np.float16)),
    ("INT8", np.array([-128, 127], dtype=np.int8)),
    ("UINT8", np.array([[0, 255]], dtype=np.uint8)),
    ("INT32", np.array([-(2**31), 2**31 - 1], dtype=np.int32)),
    ("INT64", np.array([[-(2**63)], [2**63 - 1]], dtype=np.int64)),
    ("UINT64", np.array([2**64 - 1], dtype=np.uint64)),
    ("BOOL", np.array([True, False, True])),
    ("BYTES", np.array([[b"caf\xc3\xa9", b"\x00\xff"]], dtype=object)),
]


@pytest.mark.parametrize(("datatype", "array"), CODEC_CASES, ids=[c[0] for c in CODEC_CASES])
def test_gateway_tensors_read_by_tensorflow_and_back(datatype: str, array: np.ndarray) -> None:
    """What the gateway sends TensorFlow reads as the same array, and vice versa."""
    tf = importlib.import_module("tensorflow")
    from duoserve.codecs.tensorproto import decode_tensor, encode_tensor
    from duoserve.tensors import Tensor

    sent = encode_tensor(Tensor("x", array, datatype))
    as_tf = tf.make_ndarray(official_tensor.TensorProto.FromString(sent.SerializeToString()))
    assert as_tf.shape == array.shape
    np.testing.assert_array_equal(as_tf, array)

    # TensorFlow's own encoder (tensor_content for most dtypes) ...
    official = tf.make_tensor_proto(array)
    decoded = decode_tensor("y", tensor_pb2.TensorProto.FromString(official.SerializeToString()))
    assert decoded.datatype == datatype
    np.testing.assert_array_equal(decoded.data, array)
    assert decoded.data.shape == array.shape

    # ... and TF Serving's default answer encoding, typed *_val fields (AsProtoField).
    from tests.tfserving_standin.models import to_tensor_proto

    typed = to_tensor_proto(array)
    assert not typed.tensor_content
    decoded = decode_tensor("z", tensor_pb2.TensorProto.FromString(typed.SerializeToString()))
    assert decoded.datatype == datatype
    np.testing.assert_array_equal(decoded.data, array)


def test_typed_values_shorter_than_the_shape_repeat_the_last_one() -> None:
    """TensorFlow's rule for typed fields, e.g. a constant tensor sent as one value."""
    from duoserve.codecs.tensorproto import decode_tensor

    proto = tensor_pb2.TensorProto(dtype=tensor_pb2.DT_FLOAT, float_val=[7.0])
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=2)
    np.testing.assert_array_equal(decode_tensor("c", proto).data, np.full((2, 2), 7.0))
