"""Canonical inference types shared by every frontend and backend.

A tensor is a numpy array plus its Open Inference Protocol (V2) name and datatype. Frontends
decode into these types; backends encode from them. BYTES tensors are numpy object arrays of
``bytes``. The translation to and from each wire format lives in :mod:`duoserve.codecs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from duoserve.errors import BadRequest

if TYPE_CHECKING:
    from duoserve.tracing import TraceCarrier

# V2 datatype -> numpy dtype (little-endian, the wire order of the binary extension and of
# TF Serving's tensor_content).
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}

INTEGER_TYPES = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
)
_KIND_PREFIX = {"u": "UINT", "i": "INT", "f": "FP"}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of a numpy array."""
    kind = array.dtype.kind
    if kind in ("O", "S", "U"):
        return "BYTES"
    if kind == "b":
        return "BOOL"
    name = f"{_KIND_PREFIX.get(kind, '?')}{array.dtype.itemsize * 8}"
    if name not in V2_TO_NUMPY:
        raise TypeError(f"no V2 datatype for numpy dtype {array.dtype}")
    return name


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name; BadRequest for an unknown name."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(V2_TO_NUMPY)
        raise BadRequest(f"unknown datatype '{datatype}'; use one of {known}") from None


@dataclass(slots=True)
class Tensor:
    """A named tensor: numpy data plus its V2 datatype."""

    name: str
    data: np.ndarray
    datatype: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)

    @classmethod
    def from_array(cls, name: str, array: np.ndarray, **parameters: Any) -> Tensor:
        return cls(name=name, data=array, datatype=datatype_of(array), parameters=parameters)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, with its parameters (e.g. ``binary_data``)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    """One inference call, independent of the client protocol and of the backend."""

    model: str
    inputs: list[Tensor]
    version: str | None = None
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    framework: str | None = None
    """The framework of the route it is addressed to (set by the router)."""
    trace: TraceCarrier | None = None
    """The trace context this call to a backend carries, and where the backend reports what
    its span records; set by the data plane per call when the request is traced or brought a
    ``traceparent`` (duoserve.tracing). None: nothing to send."""

    def batch_size(self) -> int:
        """Rows in the request: the first dimension of the first input (1 for scalars)."""
        if not self.inputs or self.inputs[0].data.ndim == 0:
            return 1
        return int(self.inputs[0].data.shape[0])

    def with_target(self, model: str, version: str | None, framework: str) -> InferenceRequest:
        """The same request addressed to a route: the backend's model name, version, framework."""
        return InferenceRequest(
            model=model,
            inputs=self.inputs,
            version=version,
            id=self.id,
            outputs=self.outputs,
            parameters=self.parameters,
            framework=framework,
        )


@dataclass(slots=True)
class InferenceResponse:
    """The answer to an InferenceRequest."""

    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> Tensor | None:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        return None
