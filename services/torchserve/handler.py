"""TorchServe handler for DuoServe's twin models: a TorchScript model described by signature.json.

The archive holds the TorchScript file and ``signature.json``::

    {"name": "digits",
     "inputs":  [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}],
     "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}

Each request body may be (the answer takes the same form):

* Open Inference (V2) style ``{"inputs": [{"name", "shape", "datatype", "data"}]}`` ->
  ``{"outputs": [{"name", "shape", "datatype", "data": <flat row-major list>}]}``
  (``id`` is echoed when given). This is what the DuoServe gateway sends.
* named inputs ``{"pixels": <nested list>}`` -> ``{"probabilities": <nested list>}``
* a bare nested list (the single input) -> a bare nested list.
* the Open Inference Protocol's binary tensor extension: a JSON header whose input carries
  ``parameters.binary_data_size`` followed by the tensor's raw little-endian bytes, with the
  header's length in the ``Inference-Header-Content-Length`` request header -> the V2 JSON
  answer. The gateway sends this: no JSON encoding or parsing of the input data on either side.

A bad request gets HTTP 400 with ``{"code": 400, "type": "BadRequest", "message": "..."}``,
per request, so one bad request in a server-side batch does not fail the others. All valid
requests of a batch run through the model in one forward pass.

TorchServe accepts exactly one class in a handler module, so this file defines only
``SignatureHandler``; errors use TorchServe's own ``PredictionException``.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from ts.utils.util import PredictionException

logger = logging.getLogger(__name__)

# V2 datatype -> numpy dtype for the tensors a twin model can take or give.
NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
JSON_CONTENT_TYPE = "application/json"


def _bad_request(message: str) -> PredictionException:
    return PredictionException(message, 400)


class SignatureHandler:
    """Serves one TorchScript model with one input and one output named in signature.json."""

    def __init__(self) -> None:
        self.initialized = False
        self.model: Any = None
        self.device = torch.device("cpu")
        self.input_spec: dict[str, Any] = {}
        self.output_spec: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Load the TorchScript model and its signature from the unpacked archive."""
        properties = context.system_properties
        model_dir = properties.get("model_dir") or "."
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        manifest = getattr(context, "manifest", None) or {}
        serialized = manifest.get("model", {}).get("serializedFile", "model.pt")
        self.model = torch.jit.load(os.path.join(model_dir, serialized), map_location=self.device)
        self.model.eval()

        with open(os.path.join(model_dir, "signature.json"), encoding="utf-8") as f:
            signature = json.load(f)
        if len(signature["inputs"]) != 1 or len(signature["outputs"]) != 1:
            raise ValueError("signature.json must declare exactly one input and one output")
        (self.input_spec,) = signature["inputs"]
        (self.output_spec,) = signature["outputs"]
        logger.info(
            "loaded %s on %s: %s -> %s",
            signature.get("name", serialized),
            self.device,
            self.input_spec,
            self.output_spec,
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]] | None, context: Any) -> list[str]:
        """Answer every request of TorchServe's batch, one string of JSON each."""
        requests = data or []
        answers: list[str] = [""] * len(requests)
        valid: list[tuple[int, np.ndarray, str, dict[str, Any]]] = []
        for idx, request in enumerate(requests):
            try:
                array, style, extra = self._decode(request, self._header_length(context, idx))
            except PredictionException as e:
                answers[idx] = self._error(context, idx, e)
                continue
            valid.append((idx, array, style, extra))

        if valid:
            outputs = self._forward([array for _, array, _, _ in valid])
            start = 0
            for idx, array, style, extra in valid:
                rows = outputs[start : start + len(array)]
                start += len(array)
                answers[idx] = json.dumps(self._encode(rows, style, extra), separators=(",", ":"))
                self._set_status(context, idx, 200, JSON_CONTENT_TYPE)
        return answers

    # -- request decoding ------------------------------------------------------------------

    @staticmethod
    def _header_length(context: Any, idx: int) -> str | None:
        """The Inference-Header-Content-Length request header, whatever its case."""
        if context is None or getattr(context, "request_processor", None) is None:
            return None
        for key, value in (context.get_all_request_header(idx) or {}).items():
            if str(key).lower() == "inference-header-content-length":
                return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
        return None

    def _decode(
        self, request: Any, header_length: str | None = None
    ) -> tuple[np.ndarray, str, dict[str, Any]]:
        """(input array, body style, extra answer fields) of one request; 400 when unusable."""
        body = request.get("data") if isinstance(request, dict) else None
        if body is None and isinstance(request, dict):
            body = request.get("body")
        if header_length is not None:
            return self._decode_binary(body, header_length)
        if isinstance(body, (bytes, bytearray)):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad_request("request body is not UTF-8 text; send JSON") from None
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except json.JSONDecodeError as e:
                raise _bad_request(f"request body is not valid JSON ({e}); send JSON") from None
        if body is None:
            raise _bad_request("request body is empty; send JSON")

        name = self.input_spec["name"]
        if isinstance(body, list):
            return self._to_array(body, "request body"), "list", {}
        if not isinstance(body, dict):
            raise _bad_request(
                f"request body must be a JSON object or list, not {type(body).__name__}"
            )
        inputs = body.get("inputs")
        if isinstance(inputs, list) and all(isinstance(i, dict) for i in inputs) and inputs:
            return self._decode_v2(body)
        unknown = sorted(set(body) - {name})
        if unknown or name not in body:
            raise _bad_request(
                f"unknown input(s) {unknown}; this model takes one input named '{name}'"
                if unknown
                else f"missing input '{name}'"
            )
        return self._to_array(body[name], f"input '{name}'"), "named", {}

    def _decode_binary(
        self, body: Any, header_length: str
    ) -> tuple[np.ndarray, str, dict[str, Any]]:
        """A V2 body with the binary tensor extension: JSON header, then the raw bytes."""
        if not isinstance(body, (bytes, bytearray)):
            raise _bad_request("a binary tensor body must be sent as application/octet-stream")
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(
            body
        ):
            raise _bad_request(
                "Inference-Header-Content-Length must be the byte length of the JSON header"
            )
        split = int(header_length)
        try:
            header = json.loads(bytes(body[:split]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad_request(f"the JSON header is not valid JSON ({e})") from None
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            raise _bad_request("the JSON header needs an 'inputs' list")
        raw = memoryview(body)[split:]
        offset = 0
        for tensor in header["inputs"]:
            if not isinstance(tensor, dict):
                raise _bad_request("each entry of 'inputs' must be an object")
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is None:
                continue
            if not isinstance(size, int) or size < 0 or offset + size > len(raw):
                raise _bad_request(f"binary_data_size {size} runs past the {len(raw)} bytes sent")
            chunk = raw[offset : offset + size]
            offset += size
            datatype = tensor.get("datatype")
            if datatype not in NUMPY_DTYPES:
                raise _bad_request(f"datatype {datatype!r} cannot be sent as binary here")
            itemsize = np.dtype(NUMPY_DTYPES[datatype]).itemsize
            if size % itemsize:
                raise _bad_request(f"{size} bytes are not a whole number of {datatype} values")
            # Little-endian on the wire (the extension's rule), whatever this machine is.
            dtype = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
            tensor["data"] = np.frombuffer(chunk, dtype=dtype).astype(
                NUMPY_DTYPES[datatype], copy=False
            )
        if offset != len(raw):
            raise _bad_request(f"{len(raw) - offset} bytes of binary data no input claims")
        return self._decode_v2(header)

    def _decode_v2(self, body: dict[str, Any]) -> tuple[np.ndarray, str, dict[str, Any]]:
        name = self.input_spec["name"]
        datatype = self.input_spec["datatype"]
        inputs = body["inputs"]
        names = [i.get("name") for i in inputs]
        if names != [name]:
            raise _bad_request(f"inputs {names} do not match the model's one input '{name}'")
        (tensor,) = inputs
        got = tensor.get("datatype")
        if got != datatype:
            raise _bad_request(f"input '{name}' has datatype {got!r}; the model takes {datatype}")
        if "data" not in tensor:
            raise _bad_request(f"input '{name}' has no 'data'; send it as a JSON list")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _bad_request(f"input '{name}' needs 'shape' as a list of non-negative integers")
        array = self._to_array(tensor["data"], f"input '{name}'", reshape=shape)

        requested = body.get("outputs")
        if requested is not None:
            wanted = [o.get("name") if isinstance(o, dict) else o for o in requested]
            unknown = [w for w in wanted if w != self.output_spec["name"]]
            if unknown:
                raise _bad_request(
                    f"unknown output(s) {unknown}; this model has one output "
                    f"'{self.output_spec['name']}'"
                )
        extra = {"id": body["id"]} if "id" in body else {}
        return array, "v2", extra

    def _to_array(self, data: Any, what: str, reshape: list[int] | None = None) -> np.ndarray:
        """Data as a numpy array of the input's dtype, checked against the input's shape."""
        spec_shape: list[int] = self.input_spec["shape"]
        dtype = NUMPY_DTYPES[self.input_spec["datatype"]]
        try:
            array = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError):
            raise _bad_request(f"{what} must be a rectangular (nested) list of numbers") from None
        if reshape is not None:
            if array.ndim not in (1, len(reshape)):
                raise _bad_request(f"{what}: 'data' must be flat or nested like 'shape' {reshape}")
            if array.size != int(np.prod(reshape)):
                raise _bad_request(
                    f"{what}: 'data' has {array.size} values but 'shape' {reshape} needs "
                    f"{int(np.prod(reshape))}"
                )
            array = array.reshape(reshape)
        expected = ["n" if d == -1 else d for d in spec_shape]
        fits = array.ndim == len(spec_shape) and all(
            want in (-1, got) for want, got in zip(spec_shape, array.shape, strict=True)
        )
        if not fits:
            raise _bad_request(
                f"{what} has shape {list(array.shape)}; the model takes "
                f"[{', '.join(map(str, expected))}]"
            )
        return array

    # -- inference and answers -------------------------------------------------------------

    def _forward(self, arrays: list[np.ndarray]) -> np.ndarray:
        """One forward pass over every valid request of the batch."""
        batch = np.concatenate(arrays, axis=0)
        if len(batch) == 0:
            out_shape = [0] + [d for d in self.output_spec["shape"][1:]]
            return np.zeros(out_shape, dtype=NUMPY_DTYPES[self.output_spec["datatype"]])
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self.device))
        return out.detach().cpu().numpy().astype(NUMPY_DTYPES[self.output_spec["datatype"]])

    def _encode(self, rows: np.ndarray, style: str, extra: dict[str, Any]) -> Any:
        name = self.output_spec["name"]
        if style == "list":
            return rows.tolist()
        if style == "named":
            return {name: rows.tolist()}
        output = {
            "name": name,
            "shape": list(rows.shape),
            "datatype": self.output_spec["datatype"],
            "data": rows.reshape(-1).tolist(),
        }
        return {**extra, "outputs": [output]}

    def _error(self, context: Any, idx: int, error: PredictionException) -> str:
        logger.info("bad request %d: %s", idx, error.message)
        self._set_status(context, idx, error.error_code, JSON_CONTENT_TYPE)
        body = {"code": error.error_code, "type": "BadRequest", "message": error.message}
        return json.dumps(body)

    @staticmethod
    def _set_status(context: Any, idx: int, code: int, content_type: str) -> None:
        # Per-request status and content type: TorchServe sends these to each client.
        if context is None or getattr(context, "request_processor", None) is None:
            return
        context.set_response_status(code=code, phrase=HTTPStatus(code).phrase, idx=idx)
        context.set_response_content_type(idx, content_type)
