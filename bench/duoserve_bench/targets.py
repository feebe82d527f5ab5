"""What the load generator sends: a payload (named numpy tensors) encoded once, up front, in
the wire format of the target (gateway front doors, TorchServe, TF Serving REST or gRPC, any V2
server). Encoding happens before the clock starts, so the client spends its time on the wire.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from duoserve.codecs.arrays import array_from_json, array_to_json
from duoserve.codecs.v2 import binary_request
from duoserve.tensors import V2_TO_NUMPY, Tensor

TARGETS = ("gateway", "v2", "torchserve", "tfserving-rest", "tfserving-grpc")
PROTOCOLS = ("v2", "v2-binary", "tfserving", "torchserve")
# TF Serving's Predict method (as backends/tfserving/grpc_api.py PREDICT; not imported: grpc-free
# here)
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"


@dataclass(slots=True)
class InputSpec:
    """One model input as the payload generator needs it."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(slots=True)
class RequestSpec:
    """One pre-encoded request, picklable so load-generator processes can receive it.

    ``kind`` "http": POST ``body`` to ``url`` with ``headers``. ``kind`` "grpc": call ``method``
    on ``url`` (host:port) with the serialized message ``body``.
    """

    kind: str
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str = ""
    rows: int = 1
    description: str = ""


# -- payloads ---------------------------------------------------------------------------


def parse_input_option(text: str) -> InputSpec:
    """``name:DATATYPE:d1xd2x...`` (the batch dimension is added) -> InputSpec."""
    try:
        name, datatype, dims = text.split(":")
        shape = [-1, *(int(d) for d in dims.split("x") if d)]
    except ValueError:
        raise ValueError(f"--input '{text}': expected name:DATATYPE:8x8") from None
    if datatype not in V2_TO_NUMPY:
        raise ValueError(f"--input '{text}': unknown datatype {datatype}")
    return InputSpec(name, datatype, shape)


def fetch_signature(base_url: str, model: str, timeout_s: float = 10.0) -> list[InputSpec]:
    """The inputs of ``model`` from a V2 server's metadata (``GET /v2/models/{m}``)."""
    url = f"{base_url.rstrip('/')}/v2/models/{quote(model, safe='')}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 - user URL
            doc = json.load(answer)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise RuntimeError(
            f"cannot read the signature of '{model}' from {url} ({error}); "
            "give --payload or --input name:DATATYPE:dims"
        ) from None
    return [InputSpec(i["name"], i["datatype"], list(i["shape"])) for i in doc["inputs"]]


def random_tensors(
    inputs: list[InputSpec],
    rows: int,
    value_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> dict[str, tuple[str, np.ndarray]]:
    """Random data fitting each input: variable dims take ``rows`` (first) or 1 (others)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for spec in inputs:
        shape = [(rows if i == 0 else 1) if d == -1 else d for i, d in enumerate(spec.shape)]
        dtype = V2_TO_NUMPY[spec.datatype]
        if spec.datatype == "BYTES":
            flat = [
                bytes(rng.integers(97, 123, 8, dtype=np.uint8)) for _ in range(math.prod(shape))
            ]
            array = np.empty(len(flat), dtype=object)
            array[:] = flat
            array = array.reshape(shape)
        elif spec.datatype == "BOOL":
            array = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu":
            lo, hi = value_range or (0, min(int(np.iinfo(dtype).max), 255))
            array = rng.integers(int(lo), int(hi) + 1, shape).astype(dtype)
        else:
            lo, hi = value_range or (0.0, 1.0)
            array = rng.uniform(lo, hi, shape).astype(dtype)
        tensors[spec.name] = (spec.datatype, array)
    return tensors


def load_payload(path: Path) -> dict[str, tuple[str, np.ndarray]] | bytes:
    """A V2 infer body becomes tensors (re-encoded per protocol); anything else stays raw."""
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw
    if not (isinstance(doc, dict) and isinstance(doc.get("inputs"), list)):
        return raw
    items = doc["inputs"]
    if not all(isinstance(i, dict) and "data" in i and "datatype" in i for i in items):
        return raw
    tensors = {}
    for item in items:
        array = array_from_json(item["data"], item["datatype"], item["name"])
        tensors[item["name"]] = (item["datatype"], array.reshape(item["shape"]))
    return tensors


# -- encoders ---------------------------------------------------------------------------


def _nested(array: np.ndarray) -> Any:
    if array.dtype.kind == "O":
        return np.vectorize(lambda v: v.decode("utf-8", "replace"), otypes=[object])(array).tolist()
    return array.tolist()


def v2_json_body(tensors: dict[str, tuple[str, np.ndarray]]) -> bytes:
    inputs = [
        {"name": n, "shape": list(a.shape), "datatype": dt, "data": array_to_json(a)}
        for n, (dt, a) in tensors.items()
    ]
    return json.dumps({"inputs": inputs}, separators=(",", ":")).encode()


def v2_binary_body(tensors: dict[str, tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    """JSON header + raw tensors; binary outputs asked for too. Returns (body, header length)."""
    inputs = [Tensor(n, a, dt) for n, (dt, a) in tensors.items()]
    return binary_request(inputs, parameters={"binary_data_output": True})


def tfserving_rest_body(tensors: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """Columnar ``{"inputs": {name: nested list}}``, which fits any number of inputs."""
    doc = {"inputs": {n: _nested(a) for n, (_, a) in tensors.items()}}
    return json.dumps(doc, separators=(",", ":")).encode()


def tfserving_grpc_body(
    tensors: dict[str, tuple[str, np.ndarray]], model: str, signature: str
) -> bytes:
    """A serialized PredictRequest with raw ``tensor_content``: the gateway's own encoder."""
    from duoserve.codecs.tensorproto import predict_request

    inputs = [Tensor(name, array, datatype) for name, (datatype, array) in tensors.items()]
    data: bytes = predict_request(model, None, signature, inputs).SerializeToString()
    return data


def read_token(path: str) -> str:
    """TorchServe's key_file.json (inference key) or a file holding just the key."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if text.startswith("{"):
        return str(json.loads(text)["inference"]["key"])
    return text


def build_request(
    *,
    target: str,
    url: str,
    model: str,
    payload: dict[str, tuple[str, np.ndarray]] | bytes,
    protocol: str = "v2",
    framework: str | None = None,
    token: str | None = None,
    signature: str = "serving_default",
    extra_headers: dict[str, str] | None = None,
) -> RequestSpec:
    """Encode the payload for ``target`` (and, through the gateway, its front door)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target '{target}'; use one of {', '.join(TARGETS)}")
    base = url.rstrip("/")
    headers = {"content-type": "application/json", **(extra_headers or {})}
    name = quote(model, safe="")
    rows = _rows(payload)
    if target == "gateway" and framework:
        headers["x-duoserve-framework"] = framework
    if target == "tfserving-grpc":
        if isinstance(payload, bytes):
            raise ValueError("tfserving-grpc needs tensors (a V2 payload or a signature)")
        address = base.removeprefix("grpc://").removeprefix("http://")
        body = tfserving_grpc_body(payload, model, signature)
        return RequestSpec("grpc", address, body, {}, PREDICT_METHOD, rows, f"grpc {address}")
    if target == "torchserve":
        protocol = "torchserve"
        if token:
            headers["authorization"] = f"Bearer {token}"
    elif target == "tfserving-rest":
        protocol = "tfserving"
    elif target == "v2" and protocol not in ("v2", "v2-binary"):
        raise ValueError("a V2 server speaks --protocol v2 or v2-binary")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    paths = {
        "v2": f"/v2/models/{name}/infer",
        "v2-binary": f"/v2/models/{name}/infer",
        "tfserving": f"/v1/models/{name}:predict",
        "torchserve": f"/predictions/{name}",
    }
    full = base + paths[protocol]
    if isinstance(payload, bytes):
        body = payload
    elif protocol == "v2-binary":
        body, header_length = v2_binary_body(payload)
        headers["content-type"] = "application/octet-stream"
        headers["inference-header-content-length"] = str(header_length)
    elif protocol == "tfserving":
        body = tfserving_rest_body(payload)
    else:  # v2 and torchserve take the same tensor JSON (DuoServe's TorchServe handler)
        body = v2_json_body(payload)
    return RequestSpec("http", full, body, headers, "POST", rows, f"POST {full}")


def _rows(payload: dict[str, tuple[str, np.ndarray]] | bytes) -> int:
    if isinstance(payload, bytes):
        return 1
    first = next(iter(payload.values()))[1]
    return int(first.shape[0]) if first.ndim else 1
