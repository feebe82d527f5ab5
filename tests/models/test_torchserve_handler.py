"""The TorchServe handler, run in-process on the built digits.mar as TorchServe would call it."""

from __future__ import annotations

import importlib.util
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import build, digits, resnet

with warnings.catch_warnings():
    # ts/__init__.py reads its version.txt without closing it: TorchServe's leak, not ours.
    warnings.simplefilter("ignore", ResourceWarning)
    from ts.context import Context, RequestProcessor

HANDLER_PATH = build.HANDLER
pytestmark = pytest.mark.filterwarnings(
    f"ignore:{build.TORCHSCRIPT_DEPRECATION}:DeprecationWarning"
)


def load_handler(model_store: Path, name: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SignatureHandler initialised from an unpacked archive, like a TorchServe worker."""
    model_dir = tmp_path_factory.mktemp(f"{name}-mar")
    with zipfile.ZipFile(model_store / "torchserve" / f"{name}.mar") as mar:
        mar.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    spec = importlib.util.spec_from_file_location("duoserve_ts_handler", HANDLER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.SignatureHandler()
    instance.initialize(Context(name, str(model_dir), manifest, 8, None, "0.12.0"))
    return instance


@pytest.fixture(scope="module")
def handler(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_handler(model_store, "digits", tmp_path_factory)


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    x_test, y_test = digits.evaluation_data()
    return x_test[:5], y_test[:5]


def v2(
    name: str = "pixels", shape: list[int] | None = None, datatype: str = "FP32", **extra: Any
) -> dict[str, Any]:
    """A V2 request body with 64 zeros as data."""
    tensor = {"name": name, "shape": shape or [1, 8, 8], "datatype": datatype, "data": [0] * 64}
    return {"inputs": [tensor], **extra}


def call(handler: Any, *bodies: Any) -> list[tuple[int, Any]]:
    """Send one TorchServe batch; (status, parsed body) per request."""
    context = Context("digits", "", {}, len(bodies), None, "0.12.0")
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    answers = handler.handle([{"body": body} for body in bodies], context)
    assert len(answers) == len(bodies)
    return [
        (context.get_response_status(i)[0], json.loads(answer)) for i, answer in enumerate(answers)
    ]


def test_v2_body_gets_v2_answer(handler: Any, samples: Any) -> None:
    x, y = samples
    body = {
        "id": "42",
        "inputs": [{"name": "pixels", "shape": [5, 8, 8], "datatype": "FP32",
                    "data": x.reshape(-1).tolist()}],
    }  # fmt: skip
    [(status, answer)] = call(handler, json.dumps(body).encode())
    assert status == 200
    assert answer["id"] == "42"
    [output] = answer["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    assert output["shape"] == [5, 10]
    probabilities = np.asarray(output["data"]).reshape(5, 10)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), y)


def test_v2_accepts_nested_data(handler: Any, samples: Any) -> None:
    x, _ = samples
    body = {"inputs": [{"name": "pixels", "shape": [5, 8, 8], "datatype": "FP32",
                        "data": x.tolist()}]}  # fmt: skip
    [(status, answer)] = call(handler, body)
    assert status == 200 and answer["outputs"][0]["shape"] == [5, 10]


def test_named_inputs_get_named_outputs(handler: Any, samples: Any) -> None:
    x, y = samples
    [(status, answer)] = call(handler, {"pixels": x.tolist()})
    assert status == 200
    assert list(answer) == ["probabilities"]
    np.testing.assert_array_equal(np.argmax(answer["probabilities"], axis=1), y)


def test_bare_list_gets_bare_list(handler: Any, samples: Any) -> None:
    x, y = samples
    [(status, answer)] = call(handler, bytearray(json.dumps(x.tolist()).encode()))
    assert status == 200
    np.testing.assert_array_equal(np.argmax(answer, axis=1), y)


def test_batch_answers_each_request_and_isolates_bad_ones(handler: Any, samples: Any) -> None:
    x, y = samples
    results = call(
        handler,
        {"pixels": x[:2].tolist()},
        b"{broken",
        x[2:5].tolist(),
    )
    (s0, a0), (s1, a1), (s2, a2) = results
    assert (s0, s1, s2) == (200, 400, 200)
    np.testing.assert_array_equal(np.argmax(a0["probabilities"], axis=1), y[:2])
    np.testing.assert_array_equal(np.argmax(a2, axis=1), y[2:5])
    assert a1["code"] == 400 and "not valid JSON" in a1["message"]


def test_batched_answers_match_single_answers(handler: Any, samples: Any) -> None:
    x, _ = samples
    alone = [call(handler, x[i : i + 1].tolist())[0][1] for i in range(3)]
    together = [answer for _, answer in call(handler, *(x[i : i + 1].tolist() for i in range(3)))]
    np.testing.assert_allclose(np.asarray(together), np.asarray(alone), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"pixels": [[1, 2, 3]]}, "has shape [1, 3]; the model takes [n, 8, 8]"),
        ([[[1] * 8] * 7], "has shape [1, 7, 8]"),
        ({"pixel": [[0] * 8] * 8}, "unknown input(s) ['pixel']"),
        ({"pixels": [[["a"] * 8] * 8]}, "must be a rectangular (nested) list of numbers"),
        ({"pixels": [[[1] * 8] * 8, [[1] * 8]]}, "must be a rectangular (nested) list of numbers"),
        ("not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (42, "must be a JSON object or list"),
        (v2(name="image"), "do not match the model's one input 'pixels'"),
        (v2(shape=[2, 8, 8]), "has 64 values but 'shape' [2, 8, 8] needs 128"),
        (v2(datatype="INT32"), "datatype 'INT32'; the model takes FP32"),
        (v2(outputs=[{"name": "logits"}]), "unknown output(s) ['logits']"),
    ],
    ids=[
        "wrong-shape", "missing-row", "unknown-name", "strings", "ragged", "bad-json", "empty",
        "scalar", "v2-unknown-input", "v2-size", "v2-datatype", "v2-unknown-output",
    ],
)  # fmt: skip
def test_bad_request_gets_400_saying_what_to_fix(handler: Any, body: Any, message: str) -> None:
    raw = body.encode() if isinstance(body, str) else body
    [(status, answer)] = call(handler, raw)
    assert status == 400
    assert answer["code"] == 400 and answer["type"] == "BadRequest"
    assert message in answer["message"]


def test_handler_follows_another_signature(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same handler serves resnet by its own names and shapes, read from signature.json."""
    resnet_handler = load_handler(model_store, "resnet", tmp_path_factory)
    images, _ = resnet.evaluation_data()
    [(status, answer)] = call(resnet_handler, {"images": images[:2].tolist()})
    assert status == 200
    expected = build.predict_torchscript(
        model_store / "pytorch" / "resnet" / "1" / "model.pt", images[:2]
    )
    np.testing.assert_allclose(np.asarray(answer["logits"]), expected, atol=1e-5)
    [(status, answer)] = call(resnet_handler, {"images": images[:1, :16].tolist()})
    assert status == 400 and "the model takes [n, 32, 32, 3]" in answer["message"]


def call_binary(handler: Any, body: bytes, header_length: str) -> tuple[int, Any]:
    """One request as TorchServe hands over an application/octet-stream body and its headers."""
    context = Context("digits", "", {}, 1, None, "0.12.0")
    context.request_processor = [
        RequestProcessor(
            {"body": {"content-type": "application/octet-stream"},
             "Inference-Header-Content-Length": header_length}
        )
    ]  # fmt: skip
    [answer] = handler.handle([{"body": bytearray(body)}], context)
    return context.get_response_status(0)[0], json.loads(answer)


def binary(x: np.ndarray, size: int | None = None) -> tuple[bytes, str]:
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32",
                     "parameters": {"binary_data_size": len(raw) if size is None else size}}]}
    ).encode()  # fmt: skip
    return header + raw, str(len(header))


def test_binary_tensor_body_answers_like_json(handler: Any, samples: Any) -> None:
    x, y = samples
    body, length = binary(x)
    status, answer = call_binary(handler, body, length)
    assert status == 200
    [(json_status, from_json)] = call(
        handler,
        json.dumps({"inputs": [{"name": "pixels", "shape": [5, 8, 8], "datatype": "FP32",
                                "data": x.reshape(-1).tolist()}]}).encode(),
    )  # fmt: skip
    assert json_status == 200
    assert answer == from_json
    probabilities = np.asarray(answer["outputs"][0]["data"]).reshape(5, 10)
    assert (probabilities.argmax(axis=1) == y).mean() >= 0.8


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda body, length: (body, "x"), "Inference-Header-Content-Length"),
        (lambda body, length: (body, str(len(body) + 1)), "Inference-Header-Content-Length"),
        (lambda body, length: (body[:-4], length), "runs past"),
        (lambda body, length: (body + b"xxxx", length), "no input claims"),
        (lambda body, length: (b"[" + body[1:], length), "not valid JSON"),
    ],
)
def test_bad_binary_bodies_get_400_naming_the_problem(
    handler: Any, samples: Any, mangle: Any, message: str
) -> None:
    body, length = mangle(*binary(samples[0][:1]))
    status, answer = call_binary(handler, body, length)
    assert status == 400
    assert message in answer["message"]
