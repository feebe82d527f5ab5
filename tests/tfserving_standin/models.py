"""The stand-in's model core: config, version policy, servable lookup, Predict on real TensorFlow.

Behaviour follows TF Serving's sources (tensorflow/serving): servable lookup and its error texts
(core/aspired_versions_manager / server_core.cc), model status (model_servers/
get_model_status_impl.cc), Predict output serialization as typed *_val fields by default
(servables/tensorflow/predict_util.cc, kAsProtoField).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.config import model_server_config_pb2

log = logging.getLogger("tfserving_standin")

DEFAULT_SIGNATURE = "serving_default"


class ServingError(Exception):
    """A TF Serving error status: a canonical code plus TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


@dataclass
class Servable:
    """One loaded version of one model."""

    name: str
    version: int
    path: Path
    loaded: Any
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]

    def signature(self, name: str) -> meta_graph_pb2.SignatureDef:
        key = name or DEFAULT_SIGNATURE
        signature = self.signature_defs.get(key)
        if signature is None or key not in self.loaded.signatures:
            raise invalid(f'Serving signature name: "{key}" not found in signature def')
        return signature

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_filter: list[str]
    ) -> dict[str, np.ndarray]:
        """Run a signature on numpy inputs; TF Serving's validation and error codes."""
        key = signature_name or DEFAULT_SIGNATURE
        signature = self.signature(key)
        required = set(signature.inputs)
        sent = set(inputs)
        if sent != required:
            raise invalid(
                f"input size does not match signature: {len(sent)}!={len(required)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(required))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - required))}}}. "
                f"Missing but required: {{{','.join(sorted(required - sent))}}}."
            )
        unknown = [name for name in output_filter if name not in signature.outputs]
        if unknown:
            raise invalid(
                "output tensor alias not found in signature: "
                f"{unknown[0]} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.outputs))}}}."
            )
        feeds = {}
        for name, array in inputs.items():
            info = signature.inputs[name]
            expected = tf.dtypes.as_dtype(info.dtype)
            got = tf.dtypes.as_dtype(array.dtype)
            if got != expected:
                raise invalid(
                    f"Expected input {name} to be {_type_string(expected)} but get "
                    f"{_type_string(got)}."
                )
            dims = [d.size for d in info.tensor_shape.dim]
            if not info.tensor_shape.unknown_rank and (
                len(dims) != array.ndim
                or any(want not in (-1, got) for want, got in zip(dims, array.shape, strict=True))
            ):
                shape = ",".join(str(d) for d in array.shape)
                want = ",".join("?" if d == -1 else str(d) for d in dims)
                raise invalid(
                    f"input tensor {name} has shape [{shape}], "
                    f"which is incompatible with the signature's [{want}]"
                )
            feeds[name] = tf.constant(array, dtype=expected)
        try:
            results = self.loaded.signatures[key](**feeds)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
            raise invalid(str(error).split("\n")[0]) from None
        except tf.errors.OpError as error:
            raise ServingError(grpc.StatusCode.INTERNAL, error.message) from None
        wanted = output_filter or list(signature.outputs)
        return {name: results[name].numpy() for name in wanted}


def _type_string(dtype: tf.DType) -> str:
    """TensorFlow's DataTypeString: DT_FLOAT -> "float", DT_INT32 -> "int32"."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum).removeprefix("DT_").lower()


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of the SavedModel's serving MetaGraph, as TF Serving reports them."""
    saved_model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise RuntimeError(f"{path}: no MetaGraph tagged 'serve'")


@dataclass
class ModelEntry:
    name: str
    servables: dict[int, Servable]
    labels: dict[str, int] = field(default_factory=dict)

    def latest(self) -> Servable:
        return self.servables[max(self.servables)]


def _versions_on_disk(base_path: Path) -> list[int]:
    return sorted(int(p.name) for p in base_path.iterdir() if p.is_dir() and p.name.isdigit())


def _versions_to_load(config: model_server_config_pb2.ModelConfig, on_disk: list[int]) -> list[int]:
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return on_disk
    if choice == "specific":
        return [v for v in on_disk if v in set(policy.specific.versions)]
    count = policy.latest.num_versions if choice == "latest" else 1
    return on_disk[-max(count, 1) :]


class ModelRegistry:
    """Every configured model with its loaded versions; thread-safe reads."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        self.models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        for model_config in config.model_config_list.config:
            self.models[model_config.name] = self._load(model_config)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelRegistry:
        config = text_format.Parse(
            Path(path).read_text(encoding="utf-8"), model_server_config_pb2.ModelServerConfig()
        )
        return cls(config)

    @staticmethod
    def _load(config: model_server_config_pb2.ModelConfig) -> ModelEntry:
        if config.model_platform not in ("", "tensorflow"):
            raise RuntimeError(
                f"model {config.name}: platform {config.model_platform!r} unsupported"
            )
        base_path = Path(config.base_path)
        versions = _versions_to_load(config, _versions_on_disk(base_path))
        if not versions:
            raise RuntimeError(f"No versions of servable {config.name} found under {base_path}")
        servables = {}
        for version in versions:
            path = base_path / str(version)
            started = time.monotonic()
            loaded = tf.saved_model.load(str(path))
            servables[version] = Servable(
                config.name, version, path, loaded, read_signature_defs(path)
            )
            log.info(
                "Successfully loaded servable version {name: %s version: %d} in %.1fs",
                config.name,
                version,
                time.monotonic() - started,
            )
        labels = dict(config.version_labels)
        for version in labels.values():
            if version not in servables:
                # TF Serving refuses labels on unavailable versions (server_core.cc).
                raise RuntimeError(
                    f"Request to assign label to version {version} of model {config.name}, "
                    "which is not currently available for inference"
                )
        return ModelEntry(config.name, servables, labels)

    def resolve(self, name: str, version: int | None, label: str | None) -> Servable:
        """The servable a ModelSpec names, with TF Serving's codes and messages."""
        entry = self.models.get(name)
        if label:
            if entry is None or label not in entry.labels:
                raise invalid(f"Unrecognized servable version label: {label}")
            version = entry.labels[label]
        if version is None:
            if entry is None or not entry.servables:
                raise not_found(f"Servable not found for request: Latest({name})")
            return entry.latest()
        if entry is None or version not in entry.servables:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return entry.servables[version]

    def status(self, name: str, version: int | None) -> list[tuple[int, str]]:
        """(version, state) pairs like GetModelStatus; NOT_FOUND as TF Serving words it.

        A version label in the request is not consulted: get_model_status_impl.cc looks only at
        model_spec.version and otherwise lists every version.
        """
        entry = self.models.get(name)
        if version is not None:
            if entry is None or version not in entry.servables:
                raise not_found(f"Could not find version {version} of model {name}")
            return [(version, "AVAILABLE")]
        if entry is None or not entry.servables:
            raise not_found(f"Could not find any versions of model {name}")
        return [(v, "AVAILABLE") for v in sorted(entry.servables)]


# numpy dtype -> (TF DataType, TensorProto typed field). AsProtoField's choice of field.
_PROTO_FIELDS: dict[str, tuple[int, str]] = {
    "float32": (types_pb2.DT_FLOAT, "float_val"),
    "float64": (types_pb2.DT_DOUBLE, "double_val"),
    "float16": (types_pb2.DT_HALF, "half_val"),
    "int8": (types_pb2.DT_INT8, "int_val"),
    "int16": (types_pb2.DT_INT16, "int_val"),
    "int32": (types_pb2.DT_INT32, "int_val"),
    "uint8": (types_pb2.DT_UINT8, "int_val"),
    "uint16": (types_pb2.DT_UINT16, "int_val"),
    "int64": (types_pb2.DT_INT64, "int64_val"),
    "uint32": (types_pb2.DT_UINT32, "uint32_val"),
    "uint64": (types_pb2.DT_UINT64, "uint64_val"),
    "bool": (types_pb2.DT_BOOL, "bool_val"),
}


def to_tensor_proto(array: np.ndarray, *, as_content: bool = False) -> tensor_pb2.TensorProto:
    """A numpy array as TF Serving serializes outputs: typed *_val fields, or tensor_content."""
    if array.dtype.kind in ("O", "S", "U"):
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
        proto.string_val.extend(
            v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)
        )
    else:
        dtype, field_name = _PROTO_FIELDS[array.dtype.name]
        proto = tensor_pb2.TensorProto(dtype=dtype)
        flat = array.reshape(-1)
        if as_content:
            proto.tensor_content = flat.astype(array.dtype.newbyteorder("<")).tobytes()
        elif field_name == "half_val":
            proto.half_val.extend(flat.view(np.uint16).tolist())
        else:
            getattr(proto, field_name).extend(flat.tolist())
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def from_tensor_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A request TensorProto as numpy, the way TensorFlow itself reads it."""
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as error:
        raise invalid(f"tensor parsing error: {error}") from None
