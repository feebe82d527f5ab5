"""TFServingBackend against the TF Serving stand-in serving real SavedModels, gRPC and REST.

The model tree has two versions of `digits`: 1 is the real SavedModel from models/store (built by
the `model_store` fixture; a small one with the same signature if the build made none), 2 a
different small one; label
`stable` points at 1. Every answer is checked against running the SavedModel directly.
"""

from __future__ import annotations

import importlib
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from duoserve.backends.tfserving import TFServingBackend
from duoserve.config import TFServingBackendConfig
from duoserve.errors import BadRequest, NotFound, Unavailable, UpstreamTimeout
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, RequestedOutput, Tensor
from tests.tfserving_standin.fixture import StandinHandle, start_standin, write_model_config

tf = importlib.import_module("tensorflow")

pytestmark = pytest.mark.integration

PROTOCOLS = ["grpc", "rest"]


@pytest.fixture(scope="session")
def digits_tree(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tfserving_standin.tiny_model import save_tiny_digits

    root = tmp_path_factory.mktemp("tfs-models")
    base = root / "digits"
    base.mkdir()
    real = model_store / "tensorflow" / "digits" / "1"
    if (real / "saved_model.pb").exists():
        (base / "1").symlink_to(real.resolve(), target_is_directory=True)
    else:
        save_tiny_digits(base / "1", seed=1)
    save_tiny_digits(base / "2", seed=2)
    return base


@pytest.fixture(scope="session")
def direct(digits_tree: Path) -> dict[str, object]:
    """Each version's serving_default signature, loaded in this process."""
    return {
        v: tf.saved_model.load(str(digits_tree / v)).signatures["serving_default"]
        for v in ("1", "2")
    }


def run_direct(direct: dict[str, object], version: str, pixels: np.ndarray) -> np.ndarray:
    signature = direct[version]
    return signature(pixels=tf.constant(pixels))["probabilities"].numpy()  # type: ignore[operator]


def _config(tmp: Path, digits_tree: Path) -> Path:
    return write_model_config(
        tmp / "models.config",
        {"digits": digits_tree},
        policy="all {}",
        labels={"digits": {"stable": 1}},
    )


@pytest.fixture(scope="session")
def standin(digits_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinHandle]:
    handle = start_standin(
        model_config_file=_config(tmp_path_factory.mktemp("tfs-config"), digits_tree)
    )
    try:
        yield handle
    finally:
        handle.stop()


def make_backend(handle: StandinHandle, protocol: str, **extra: object) -> TFServingBackend:
    config = TFServingBackendConfig.model_validate(
        {"kind": "tfserving", "protocol": protocol, **extra}
        | ({"grpc": handle.grpc_address} if protocol == "grpc" else {"url": handle.rest_url})
    )
    return TFServingBackend("tfs", config)


@pytest.fixture(params=PROTOCOLS)
async def backend(
    request: pytest.FixtureRequest, standin: StandinHandle
) -> AsyncIterator[TFServingBackend]:
    backend = make_backend(standin, request.param)
    await backend.start()
    yield backend
    await backend.close()


def pixels(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(rows, 8, 8)).astype(np.float32)


def digits_request(data: np.ndarray, version: str | None = None, **kw: object) -> InferenceRequest:
    return InferenceRequest(
        model="digits", inputs=[Tensor.from_array("pixels", data)], version=version, **kw
    )


async def test_latest_version_answers_like_the_savedmodel(
    backend: TFServingBackend, direct: dict[str, object]
) -> None:
    data = pixels(3)
    response = await backend.infer(digits_request(data), Deadline(10))

    (output,) = response.outputs
    assert output.name == "probabilities"
    assert output.datatype == "FP32"
    assert output.shape == [3, 10]
    np.testing.assert_allclose(output.data, run_direct(direct, "2", data), rtol=1e-6, atol=1e-7)
    if backend.config.protocol == "grpc":
        assert response.model_version == "2"  # the effective version TF Serving reports


async def test_version_number_and_label_pick_version_1(
    backend: TFServingBackend, direct: dict[str, object]
) -> None:
    data = pixels(2, seed=1)
    expected = run_direct(direct, "1", data)
    assert not np.allclose(expected, run_direct(direct, "2", data))

    for version in ("1", "stable"):
        response = await backend.infer(digits_request(data, version), Deadline(10))
        np.testing.assert_allclose(
            response.output("probabilities").data, expected, rtol=1e-6, atol=1e-7
        )


async def test_requested_output_is_returned_by_name(backend: TFServingBackend) -> None:
    request = digits_request(pixels(1), outputs=[RequestedOutput("probabilities")])
    response = await backend.infer(request, Deadline(10))
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert response.outputs[0].data.sum() == pytest.approx(1.0, rel=1e-5)


async def test_unknown_model_and_version_are_not_found(
    backend: TFServingBackend, standin: StandinHandle
) -> None:
    with pytest.raises(NotFound) as error:
        await backend.infer(
            InferenceRequest(model="nope", inputs=[Tensor.from_array("pixels", pixels(1))]),
            Deadline(10),
        )
    assert "nope" in error.value.message
    assert str(standin.grpc_port) not in error.value.message
    assert str(standin.rest_port) not in error.value.message
    with pytest.raises(NotFound):
        await backend.infer(digits_request(pixels(1), "7"), Deadline(10))


async def test_unknown_label_is_a_bad_request(backend: TFServingBackend) -> None:
    # TF Serving answers INVALID_ARGUMENT "Unrecognized servable version label" (HTTP 400).
    with pytest.raises(BadRequest, match="label"):
        await backend.infer(digits_request(pixels(1), "nightly"), Deadline(10))


async def test_wrong_shape_is_a_bad_request(backend: TFServingBackend) -> None:
    bad = np.zeros((2, 64), dtype=np.float32)
    with pytest.raises(BadRequest) as error:
        await backend.infer(digits_request(bad), Deadline(10))
    assert "pixels" in error.value.message


async def test_wrong_input_name_is_a_bad_request(backend: TFServingBackend) -> None:
    request = InferenceRequest(model="digits", inputs=[Tensor.from_array("image", pixels(1))])
    with pytest.raises(BadRequest):
        await backend.infer(request, Deadline(10))


async def test_slow_backend_past_the_deadline_is_an_upstream_timeout(
    backend: TFServingBackend, standin: StandinHandle
) -> None:
    backend_s = 5.0  # the stand-in runs its delay beside other calls: this costs no time
    standin.set_delay(backend_s * 1000)
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="300 ms"):
            await backend.infer(digits_request(pixels(1)), Deadline(0.3))
        # At the deadline, not at the backend's pace.
        assert time.monotonic() - started < backend_s
    finally:
        standin.set_delay(0)
    # and the backend (channel or session) still works afterwards
    response = await backend.infer(digits_request(pixels(1)), Deadline(10))
    assert response.outputs[0].shape == [1, 10]


async def test_ready_only_for_served_models_and_versions(backend: TFServingBackend) -> None:
    assert await backend.ready("digits") is True
    assert await backend.ready("digits", "1") is True
    assert await backend.ready("digits", "stable") is True
    assert await backend.ready("digits", "7") is False
    assert await backend.ready("nope") is False


async def test_metadata_describes_the_signature(backend: TFServingBackend) -> None:
    meta = await backend.metadata("digits", "1")
    assert meta["model_spec"] == {"name": "digits", "version": "1"}
    serving = meta["signature_def"]["serving_default"]
    assert serving["inputs"]["pixels"] == {"dtype": "DT_FLOAT", "shape": [-1, 8, 8]}
    assert serving["outputs"]["probabilities"] == {"dtype": "DT_FLOAT", "shape": [-1, 10]}


def test_standin_exports_tf_serving_metrics(standin: StandinHandle) -> None:
    url = f"{standin.rest_url}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    assert ':tensorflow:serving:request_count{model_name="digits",status="OK"}' in text
    assert (
        ':tensorflow:serving:request_latency_bucket{model_name="digits",API="Predict",'
        'entrypoint="GRPC",le="+Inf"}' in text
    )


async def test_stopped_server_is_unavailable_quickly(digits_tree: Path, tmp_path: Path) -> None:
    handle = start_standin(model_config_file=_config(tmp_path, digits_tree), monitoring=False)
    backends: list[TFServingBackend] = []
    try:
        backends += [make_backend(handle, protocol) for protocol in PROTOCOLS]
        for backend in backends:
            await backend.start()
            await backend.infer(digits_request(pixels(1)), Deadline(10))  # connected and warm
        handle.stop()
        for backend in backends:
            deadline = Deadline(5)
            with pytest.raises(Unavailable) as error:
                await backend.infer(digits_request(pixels(1)), deadline)
            # Refused at once, not timed out: its deadline was not spent waiting.
            assert not deadline.expired()
            assert error.value.reason == "backend_down"
            assert "127.0.0.1" not in error.value.message
            assert await backend.ready("digits") is False
    finally:
        handle.stop()
        for backend in backends:
            await backend.close()
