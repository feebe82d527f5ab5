"""The bodies of DuoServe's TorchServe handler (services/torchserve/handler.py), both ways: what
the TorchServe front door decodes and answers, and the JSON the TorchServe backend posts (its
binary body and the answers it reads are V2's, :mod:`duoserve.codecs.v2`).

- ``{"inputs": [{"name", "shape", "datatype", "data"}]}`` -> ``{"outputs": [...]}`` (tensors)
- ``{"<input>": nested list, ...}`` -> ``{"<output>": nested list, ...}`` (named)
- a bare nested list (the model's single input) -> a bare nested list (its first output)
"""

from __future__ import annotations

import orjson

from duoserve.codecs.arrays import array_from_json
from duoserve.codecs.v2 import decode_v2_request, json_tensor, loads_body
from duoserve.config import ModelConfig
from duoserve.errors import BadRequest
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor


def decode_predictions(
    body: bytes, model_name: str, version: str | None, config: ModelConfig
) -> tuple[InferenceRequest, str]:
    """A /predictions body -> (InferenceRequest, "tensors" | "named" | "bare")."""
    doc = loads_body(body)
    if isinstance(doc, dict) and "inputs" in doc:
        return decode_v2_request(body, model_name, version, config, parsed=doc), "tensors"
    specs = config.input_specs
    if isinstance(doc, dict):
        unknown = set(doc) - set(specs)
        if unknown:
            raise BadRequest(
                f"model '{model_name}' has no input(s) {', '.join(sorted(unknown))}; "
                f"its inputs are: {', '.join(specs)}"
            )
        values = doc
        form = "named"
    elif isinstance(doc, list):
        if len(specs) != 1:
            raise BadRequest(
                f"a bare list is accepted for single-input models only; send an object keyed "
                f"by input name ({', '.join(specs)})"
            )
        values = {next(iter(specs)): doc}
        form = "bare"
    else:
        raise BadRequest("send a JSON list (the input) or an object keyed by input name")
    inputs = []
    for name, spec in specs.items():
        if name not in values:
            raise BadRequest(f"model '{model_name}' needs input '{name}'")
        array = array_from_json(values[name], spec.datatype, name)
        limit = spec.max_elements(config.max_batch)
        if array.size > limit:
            raise BadRequest(f"input '{name}' has {array.size} values; at most {limit} allowed")
        inputs.append(Tensor(name, array, spec.datatype))
    return InferenceRequest(model=model_name, inputs=inputs, version=version), form


def encode_predictions(response: InferenceResponse, form: str, model_name: str) -> bytes:
    """An InferenceResponse in the form the request came in."""
    option = orjson.OPT_SERIALIZE_NUMPY
    if form == "tensors":
        outputs = [json_tensor(t) for t in response.outputs]
        return orjson.dumps({"model_name": model_name, "outputs": outputs}, option=option)
    if form == "bare":
        return orjson.dumps(response.outputs[0].data, option=option)
    return orjson.dumps({t.name: t.data for t in response.outputs}, option=option)


def json_body(request: InferenceRequest) -> bytes:
    """The V2-style JSON body the handler reads: data as flat lists."""
    return orjson.dumps(
        {"inputs": [json_tensor(t) for t in request.inputs]}, option=orjson.OPT_SERIALIZE_NUMPY
    )
