"""Build every twin model's artifacts into a model store.

    python -m models.build --store models/store [--models digits,resnet] [--force]

Layout written under the store:

    pytorch/<model>/1/model.pt          TorchScript (torch.jit.load, no Python class needed)
    tensorflow/<model>/1/               SavedModel for TF Serving, signature `serving_default`
    torchserve/<model>.mar              TorchServe archive: model.pt, handler.py, signature.json
    manifest.json                       paths, weight digests, accuracy and parity per model

The build is incremental: a model is skipped when its artifacts exist and the digest of the
sources that produce them (this package, the TorchServe handler, framework versions) matches the
one in the manifest. ``--force`` rebuilds. Training is seeded and deterministic, so two clean
builds give bit-identical weights (same ``weights_sha256``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

# TensorFlow reads this once, when it is first imported: set it before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HANDLER = REPO_ROOT / "services" / "torchserve" / "handler.py"
DEFAULT_STORE = REPO_ROOT / "models" / "store"
MANIFEST = "manifest.json"
VERSION = "1"
MANIFEST_FORMAT = 1


def twins() -> dict[str, ModuleType]:
    """Every model the script knows, by name (imported lazily: they pull in torch)."""
    from models import digits, digits_perturbed, resnet

    return {digits.NAME: digits, digits_perturbed.NAME: digits_perturbed, resnet.NAME: resnet}


DEFAULT_MODELS = ("digits", "digits-perturbed", "resnet")


def source_sha256() -> str:
    """Digest of everything that shapes the artifacts: sources, handler, library versions."""
    digest = hashlib.sha256()
    sources = sorted(Path(__file__).resolve().parent.glob("*.py")) + [HANDLER]
    for path in sources:
        digest.update(f"{path.name}\n".encode())
        digest.update(path.read_bytes())
    # Distribution metadata, not imports: an up-to-date check must not load TensorFlow.
    for dist in ("torch", "tensorflow", "tensorflow-cpu", "keras", "scikit-learn", "numpy"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{dist}={version}\n".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(store: Path) -> dict[str, Any]:
    path = store / MANIFEST
    if path.exists():
        manifest: dict[str, Any] = json.loads(path.read_text())
        if manifest.get("format") == MANIFEST_FORMAT:
            return manifest
    return {"format": MANIFEST_FORMAT, "models": {}}


def artifact_paths(name: str) -> dict[str, str]:
    """Store-relative artifact paths of one model."""
    return {
        "pytorch": f"pytorch/{name}/{VERSION}/model.pt",
        "tensorflow": f"tensorflow/{name}/{VERSION}",
        "torchserve": f"torchserve/{name}.mar",
    }


def is_current(store: Path, entry: dict[str, Any] | None, sources: str) -> bool:
    if not entry or entry.get("source_sha256") != sources:
        return False
    return all((store / p).exists() for p in artifact_paths(entry["name"]).values())


def _replace(tmp: Path, final: Path) -> None:
    """Move a freshly built artifact into place, so readers never see half of one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


# torch 2.13 deprecates TorchScript in favour of torch.export, but TorchServe's handler and
# the brief's contract load TorchScript; silence exactly that warning where we use it.
TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def save_torchscript(net: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATION, DeprecationWarning)
        scripted = torch.jit.script(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Save under the final file name: TorchScript names the archive's root folder after it.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        scripted.save(str(Path(tmp) / path.name))
        _replace(Path(tmp) / path.name, path)


def save_savedmodel(model: Any, signature: dict[str, Any], path: Path) -> None:
    """Save a Keras model as a SavedModel whose serving_default keys are the signature's names."""
    import tensorflow as tf

    (spec_in,) = signature["inputs"]
    (spec_out,) = signature["outputs"]
    in_name, out_name = spec_in["name"], spec_out["name"]
    shape = [None if d == -1 else d for d in spec_in["shape"]]

    class Serving(tf.Module):
        def __init__(self, keras_model: Any) -> None:
            super().__init__()
            self.model = keras_model

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=in_name)])
        def serve(self, inputs: Any) -> dict[str, Any]:
            return {out_name: self.model(inputs, training=False)}

    module = Serving(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
    _replace(tmp, path)


def archive_torchserve(name: str, model_pt: Path, signature: dict[str, Any], mar: Path) -> None:
    """Package the TorchScript model, the handler and signature.json with torch-model-archiver."""
    mar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=mar.parent) as tmp:
        sig = Path(tmp) / "signature.json"
        sig.write_text(json.dumps(signature, indent=2) + "\n")
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", VERSION,
            "--serialized-file", str(model_pt),
            "--handler", str(HANDLER),
            "--extra-files", str(sig),
            "--export-path", tmp,
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        _replace(Path(tmp) / f"{name}.mar", mar)


def predict_torchscript(path: Path, inputs: np.ndarray) -> np.ndarray:
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATION, DeprecationWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


def predict_savedmodel(path: Path, signature: dict[str, Any], inputs: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = serve(**{signature["inputs"][0]["name"]: tf.constant(inputs)})
    return np.asarray(out[signature["outputs"][0]["name"]])


def build_model(store: Path, twin: ModuleType, sources: str) -> dict[str, Any]:
    """Build one twin's three artifacts, check them, and return its manifest entry."""
    from models import porting

    started = time.perf_counter()
    name: str = twin.NAME
    signature: dict[str, Any] = twin.SIGNATURE
    paths = artifact_paths(name)

    net = twin.torch_model()
    save_torchscript(net, store / paths["pytorch"])
    keras_model = twin.keras_model(net)
    save_savedmodel(keras_model, signature, store / paths["tensorflow"])
    archive_torchserve(name, store / paths["pytorch"], signature, store / paths["torchserve"])

    # Evaluate the artifacts as written, not the in-memory models they came from.
    inputs, labels = twin.evaluation_data()
    torch_out = predict_torchscript(store / paths["pytorch"], inputs)
    tf_out = predict_savedmodel(store / paths["tensorflow"], signature, inputs)

    def accuracy(out: np.ndarray) -> float | None:
        return None if labels is None else float((out.argmax(axis=1) == labels).mean())

    return {
        "name": name,
        "version": VERSION,
        "signature": signature,
        "source_sha256": sources,
        "frameworks": {
            "pytorch": {
                "path": paths["pytorch"],
                "weights_sha256": porting.torch_weights_sha256(net),
                "file_sha256": file_sha256(store / paths["pytorch"]),
                "accuracy": accuracy(torch_out),
            },
            "tensorflow": {
                "path": paths["tensorflow"],
                "weights_sha256": porting.keras_weights_sha256(keras_model),
                "accuracy": accuracy(tf_out),
            },
            "torchserve": {
                "path": paths["torchserve"],
                "file_sha256": file_sha256(store / paths["torchserve"]),
            },
        },
        "parity": {
            "samples": int(len(inputs)),
            "argmax_agree": int((torch_out.argmax(axis=1) == tf_out.argmax(axis=1)).sum()),
            "max_abs_diff": float(np.abs(torch_out - tf_out).max()),
        },
        "build_seconds": round(time.perf_counter() - started, 2),
    }


def build(
    store: Path = DEFAULT_STORE,
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or skip, when current) the named models into ``store``; return the manifest."""
    known = twins()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(known)}")
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(store)
    sources = source_sha256()
    for name in models:
        if not force and is_current(store, manifest["models"].get(name), sources):
            print(f"{name}: up to date", file=sys.stderr)
            continue
        entry = build_model(store, known[name], sources)
        manifest["models"][name] = entry
        # Write after each model, so a failure later keeps what was built.
        tmp = store / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, store / MANIFEST)
        parity = entry["parity"]
        accuracies = {fw: entry["frameworks"][fw]["accuracy"] for fw in ("pytorch", "tensorflow")}
        print(
            f"{name}: built in {entry['build_seconds']} s, accuracy {accuracies}, "
            f"argmax agree {parity['argmax_agree']}/{parity['samples']}, "
            f"max abs diff {parity['max_abs_diff']:.3g}",
            file=sys.stderr,
        )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="model store directory")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated models to build (default: {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        build(args.store, models, force=args.force)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
