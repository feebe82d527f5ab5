"""The built twins agree: same answers from TorchScript and from the SavedModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import torch

from models import build, digits, digits_perturbed, resnet

# torch 2.13 deprecates TorchScript; TorchServe still serves it, so these tests load it.
pytestmark = pytest.mark.filterwarnings(
    f"ignore:{build.TORCHSCRIPT_DEPRECATION}:DeprecationWarning"
)


def run_torchscript(store: Path, name: str, inputs: np.ndarray) -> np.ndarray:
    model = torch.jit.load(str(store / "pytorch" / name / "1" / "model.pt"), map_location="cpu")
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


def run_savedmodel(
    store: Path, name: str, input_name: str, output_name: str, inputs: np.ndarray
) -> np.ndarray:
    loaded = tf.saved_model.load(str(store / "tensorflow" / name / "1"))
    serve = loaded.signatures["serving_default"]
    return serve(**{input_name: tf.constant(inputs)})[output_name].numpy()


@pytest.fixture(scope="module")
def digits_outputs(model_store: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x_test, y_test = digits.evaluation_data()
    pt = run_torchscript(model_store, "digits", x_test)
    tf_out = run_savedmodel(model_store, "digits", "pixels", "probabilities", x_test)
    return pt, tf_out, y_test


def test_digits_accuracy_on_held_out_split(digits_outputs: Any) -> None:
    pt, tf_out, labels = digits_outputs
    assert len(labels) == 450
    assert (pt.argmax(axis=1) == labels).mean() >= 0.95
    assert (tf_out.argmax(axis=1) == labels).mean() >= 0.95


def test_digits_frameworks_agree(digits_outputs: Any) -> None:
    pt, tf_out, _ = digits_outputs
    np.testing.assert_array_equal(pt.argmax(axis=1), tf_out.argmax(axis=1))
    assert np.abs(pt - tf_out).max() <= 1e-4
    # Softmax outputs: each row is a probability distribution.
    np.testing.assert_allclose(pt.sum(axis=1), 1.0, atol=1e-5)


def test_resnet_frameworks_agree(model_store: Path) -> None:
    images, _ = resnet.evaluation_data()
    pt = run_torchscript(model_store, "resnet", images)
    tf_out = run_savedmodel(model_store, "resnet", "images", "logits", images)
    assert pt.shape == tf_out.shape == (len(images), 10)
    np.testing.assert_array_equal(pt.argmax(axis=1), tf_out.argmax(axis=1))
    assert np.abs(pt - tf_out).max() <= 1e-3


def test_the_perturbed_twin_disagrees_with_digits_on_a_few_percent(
    model_store: Path, digits_outputs: Any
) -> None:
    """Both frameworks of digits-perturbed agree with each other, and with digits on all but
    a few percent of the held-out split: what a rollout's agreement gate must catch."""
    x_test, _ = digits.evaluation_data()
    pt = run_torchscript(model_store, "digits-perturbed", x_test)
    tf_out = run_savedmodel(model_store, "digits-perturbed", "pixels", "probabilities", x_test)
    np.testing.assert_array_equal(pt.argmax(axis=1), tf_out.argmax(axis=1))
    original = digits_outputs[0]
    disagree = (pt.argmax(axis=1) != original.argmax(axis=1)).mean()
    assert 0.02 <= disagree <= 0.05, disagree
    assert (model_store / "torchserve" / "digits-perturbed.mar").is_file()


@pytest.mark.parametrize(
    "twin", [digits, digits_perturbed, resnet], ids=["digits", "digits-perturbed", "resnet"]
)
def test_savedmodel_signature_matches_contract(model_store: Path, twin: Any) -> None:
    (spec_in,) = twin.SIGNATURE["inputs"]
    (spec_out,) = twin.SIGNATURE["outputs"]
    loaded = tf.saved_model.load(str(model_store / "tensorflow" / twin.NAME / "1"))
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    assert list(inputs) == [spec_in["name"]]
    assert inputs[spec_in["name"]].dtype == tf.float32
    assert inputs[spec_in["name"]].shape.as_list() == [None, *spec_in["shape"][1:]]
    assert list(serve.structured_outputs) == [spec_out["name"]]
    assert serve.structured_outputs[spec_out["name"]].shape.as_list() == [None, 10]


def test_manifest_records_what_was_built(model_store: Path, manifest: dict[str, Any]) -> None:
    entry = manifest["models"]["digits"]
    pytorch = entry["frameworks"]["pytorch"]
    assert pytorch["path"] == "pytorch/digits/1/model.pt"
    assert pytorch["file_sha256"] == build.file_sha256(model_store / pytorch["path"])
    assert pytorch["accuracy"] >= 0.95 and entry["frameworks"]["tensorflow"]["accuracy"] >= 0.95
    assert entry["parity"]["argmax_agree"] == entry["parity"]["samples"] == 450
    assert entry["parity"]["max_abs_diff"] <= 1e-4
    mar = entry["frameworks"]["torchserve"]
    assert mar["file_sha256"] == build.file_sha256(model_store / mar["path"])


def test_training_is_deterministic(manifest: dict[str, Any]) -> None:
    """Training again in this process gives bit-identical weights to the stored build."""
    from models import porting

    retrained = digits.torch_model()
    stored = manifest["models"]["digits"]["frameworks"]["pytorch"]["weights_sha256"]
    assert porting.torch_weights_sha256(retrained) == stored


def test_up_to_date_build_is_skipped(model_store: Path) -> None:
    model_pt = model_store / "pytorch" / "digits" / "1" / "model.pt"
    before = model_pt.stat().st_mtime_ns
    build.build(model_store, ["digits"])
    assert model_pt.stat().st_mtime_ns == before


def test_changed_sources_make_a_build_stale(model_store: Path, manifest: dict[str, Any]) -> None:
    entry = manifest["models"]["digits"]
    sources = build.source_sha256()
    assert build.is_current(model_store, entry, sources)
    assert not build.is_current(model_store, entry, "0" * 64)
    assert not build.is_current(model_store / "nowhere", entry, sources)


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build.build(tmp_path, ["nosuch"])
