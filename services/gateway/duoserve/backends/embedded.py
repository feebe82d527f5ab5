"""In-process PyTorch and TensorFlow runtimes: the laptop default, no servers needed.

Artifacts come from the model store built by ``make models``::

    <store>/pytorch/<model>/<version>/model.pt        TorchScript
    <store>/tensorflow/<model>/<version>/             SavedModel (signature serving_default)

Models run in worker threads, off the event loop; torch and TensorFlow release the GIL in their
kernels. CUDA is used when the framework sees a GPU (``device: auto``), else the CPU. torch and
TensorFlow are imported only when a route needs them, so a gateway without them still starts
for the other backends. Optional adaptive micro-batching groups concurrent requests of one model
into one forward pass (``max_batch_size`` > 1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from duoserve.backends.base import Backend
from duoserve.config import EmbeddedBackendConfig, TensorSpec
from duoserve.errors import (
    BadRequest,
    DuoServeError,
    NotFound,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor, numpy_dtype
from duoserve.tracing import CallSpan

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(slots=True)
class Signature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Runtime:
    """One loaded model version; ``run`` is called from a worker thread."""

    device: str = "cpu"

    def run(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        raise NotImplementedError


class TorchScriptRuntime(Runtime):
    """A TorchScript module; inputs passed positionally in signature order."""

    def __init__(self, path: Path, signature: Signature, device: str) -> None:
        import torch

        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self._module = torch.jit.load(str(path), map_location=device).eval()  # type: ignore[no-untyped-call]
        self._signature = signature

    def run(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        torch = self._torch
        args = [
            # torch wants writable memory; binary request bodies arrive as read-only views.
            torch.from_numpy(_writable(inputs[spec.name])).to(self.device)
            for spec in self._signature.inputs
        ]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, dict):
            values = [result[spec.name] for spec in self._signature.outputs]
        elif isinstance(result, list | tuple):
            values = list(result)
        else:
            values = [result]
        return {
            spec.name: value.detach().cpu().numpy()
            for spec, value in zip(self._signature.outputs, values, strict=False)
        }


class SavedModelRuntime(Runtime):
    """A TensorFlow SavedModel, called through one of its signatures."""

    def __init__(self, path: Path, device: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        self._tf = tf
        gpus = tf.config.list_physical_devices("GPU")
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        self.device = device
        self._tf_device = "/GPU:0" if device == "cuda" else "/CPU:0"
        with tf.device(self._tf_device):
            self._model = tf.saved_model.load(str(path))
        self._signatures = dict(self._model.signatures)

    def run(self, inputs: Arrays, outputs: list[str], signature: str = "serving_default") -> Arrays:
        tf = self._tf
        try:
            fn = self._signatures[signature]
        except KeyError:
            known = ", ".join(self._signatures)
            raise BadRequest(f"no signature '{signature}'; this model has: {known}") from None
        with tf.device(self._tf_device):
            result = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in result.items()}


@dataclass
class _Slot:
    """A registered (framework, model): its signature and loaded versions."""

    framework: str
    model: str
    signature: Signature
    versions: dict[str, Runtime] = field(default_factory=dict)
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)


class MicroBatcher:
    """Adaptive micro-batching: requests queued while the model is busy run as one batch.

    A batch closes when it holds ``max_batch_size`` rows or ``max_delay_s`` has passed since
    its first request, whichever comes first; the first request of an idle model never waits
    longer than that. Only single-input batches along the first dimension are combined.
    """

    def __init__(
        self,
        run: Callable[[Arrays], Arrays],
        executor: ThreadPoolExecutor,
        max_batch_size: int,
        max_delay_s: float,
    ) -> None:
        self._run = run
        self._executor = executor
        self._max = max_batch_size
        self._delay = max_delay_s
        self._queue: asyncio.Queue[tuple[Arrays, asyncio.Future[Arrays]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, inputs: Arrays) -> Arrays:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        await self._queue.put((inputs, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            rows = _rows(first[0])
            closes_at = loop.time() + self._delay
            while rows < self._max:
                # What already waits joins at once, even after the delay (or with a delay of
                # 0): wait_for(get(), 0) would time out before the get ran and leave it queued.
                if self._queue.empty():
                    timeout = closes_at - loop.time()
                    if timeout <= 0:
                        break
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                    # that races a result, and close() must be able to stop this loop.
                    try:
                        async with asyncio.timeout(timeout):
                            item = await self._queue.get()
                    except TimeoutError:
                        break
                else:
                    item = self._queue.get_nowait()
                batch.append(item)
                rows += _rows(item[0])
            live = [(inputs, fut) for inputs, fut in batch if not fut.cancelled()]
            if not live:
                continue
            try:
                merged = {
                    name: np.concatenate([inputs[name] for inputs, _ in live])
                    for name in live[0][0]
                }
                result = await loop.run_in_executor(self._executor, self._run, merged)
            except Exception as error:  # noqa: BLE001 - handed to every waiter
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(error)
                continue
            start = 0
            for inputs, fut in live:
                n = _rows(inputs)
                if not fut.done():
                    fut.set_result({k: v[start : start + n] for k, v in result.items()})
                start += n

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _rows(inputs: Arrays) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


_VERSION = re.compile(r"^\d+$")


class EmbeddedBackend(Backend):
    """Runs PyTorch (TorchScript) and TensorFlow (SavedModel) artifacts in this process."""

    kind = "embedded"
    call_span = CallSpan("embedded infer")

    def __init__(self, name: str, config: EmbeddedBackendConfig, base_dir: Path) -> None:
        super().__init__(name)
        self.config = config
        store = Path(config.model_store)
        self.store = store if store.is_absolute() else (base_dir / store)
        self._slots: dict[tuple[str, str], _Slot] = {}
        # One thread per framework keeps each model's kernels from fighting over 2 cores,
        # while PyTorch and TensorFlow can run side by side.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"embedded-{name}")

    def register(
        self, framework: str, model: str, inputs: list[TensorSpec], outputs: list[TensorSpec]
    ) -> None:
        """Declare a (framework, model) this backend will serve; loaded in start()."""
        self._slots.setdefault(
            (framework, model), _Slot(framework, model, Signature(inputs, outputs))
        )

    def _model_dir(self, framework: str, model: str) -> Path:
        return self.store / framework / model

    def _versions_on_disk(self, framework: str, model: str) -> list[str]:
        folder = self._model_dir(framework, model)
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        return sorted(found, key=int)

    def _load(self, slot: _Slot, version: str) -> Runtime:
        path = self._model_dir(slot.framework, slot.model) / version
        if slot.framework == "pytorch":
            return TorchScriptRuntime(path / "model.pt", slot.signature, self.config.device)
        return SavedModelRuntime(path, self.config.device)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self._slots.values():
            versions = self._versions_on_disk(slot.framework, slot.model)
            if not versions:
                log.warning(
                    "embedded backend %s: no %s artifacts for model '%s' under %s "
                    "(run `make models`)",
                    self.name,
                    slot.framework,
                    slot.model,
                    self.store,
                )
                continue
            for version in versions:
                slot.versions[version] = await loop.run_in_executor(
                    self._executor, self._load, slot, version
                )
                log.info(
                    "embedded backend %s: loaded %s model '%s' version %s on %s",
                    self.name,
                    slot.framework,
                    slot.model,
                    version,
                    slot.versions[version].device,
                )

    def _runtime(self, request: InferenceRequest) -> tuple[_Slot, str, Runtime]:
        slot = self._slots.get((request.framework or "", request.model))
        if slot is None:
            raise NotFound(f"model '{request.model}' is not served by this backend")
        if not slot.versions:
            raise Unavailable(
                f"model '{request.model}' has no {slot.framework} artifacts loaded "
                "(run `make models`)",
                reason="not_loaded",
            )
        version = request.version or max(slot.versions, key=int)
        runtime = slot.versions.get(version)
        if runtime is None:
            known = ", ".join(sorted(slot.versions, key=int))
            raise NotFound(
                f"model '{request.model}' has no version '{version}' (available: {known})"
            )
        return slot, version, runtime

    async def infer(
        self, request: InferenceRequest, deadline: Deadline, *, avoid: Collection[str] = ()
    ) -> InferenceResponse:
        slot, version, runtime = self._runtime(request)
        inputs = {tensor.name: tensor.data for tensor in request.inputs}
        wanted = [o.name for o in request.outputs] if request.outputs else []
        signature_name = str(request.parameters.get("signature_name") or "serving_default")

        def run(batch: Arrays) -> Arrays:
            if isinstance(runtime, SavedModelRuntime):
                return runtime.run(batch, wanted, signature_name)
            return runtime.run(batch, wanted)

        loop = asyncio.get_running_loop()
        try:
            if (
                self.config.max_batch_size > 1
                and len(inputs) == 1
                and signature_name == ("serving_default")
            ):
                batcher = slot.batchers.get(version)
                if batcher is None:
                    batcher = slot.batchers[version] = MicroBatcher(
                        run,
                        self._executor,
                        self.config.max_batch_size,
                        self.config.max_batch_delay_ms / 1000,
                    )
                pending: Awaitable[Arrays] = batcher.submit(inputs)
            else:
                pending = loop.run_in_executor(self._executor, run, inputs)
            result = await asyncio.wait_for(pending, deadline.check("the embedded model"))
        except TimeoutError:
            raise UpstreamTimeout(
                f"the {slot.framework} model '{slot.model}' did not finish within the deadline "
                f"({deadline.budget_s * 1000:.0f} ms)"
            ) from None
        except DuoServeError:
            raise
        except Exception as error:
            log.warning("embedded %s model '%s' failed: %r", slot.framework, slot.model, error)
            raise _model_error(error) from None
        specs = {spec.name: spec for spec in slot.signature.outputs}
        outputs = []
        for name, array in result.items():
            spec = specs.get(name)
            if spec is not None and array.dtype != numpy_dtype(spec.datatype):
                array = array.astype(numpy_dtype(spec.datatype))
            outputs.append(Tensor.from_array(name, array))
        return InferenceResponse(
            model_name=request.model, model_version=version, outputs=outputs, id=request.id
        )

    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        return any(
            (version in slot.versions) if version else bool(slot.versions)
            for (fw, name), slot in self._slots.items()
            if name == model and framework in (None, fw)
        )

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return {
            f"{framework}": sorted(slot.versions, key=int)
            for (framework, name), slot in self._slots.items()
            if name == model
        }

    async def close(self) -> None:
        for slot in self._slots.values():
            for batcher in slot.batchers.values():
                await batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _writable(array: np.ndarray) -> np.ndarray:
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, copy=True, order="C")


def _model_error(error: Exception) -> Exception:
    """Input errors the framework found are the client's fault; the rest are the model's."""
    text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    lowered = text.lower()
    if type(error).__name__ == "InvalidArgumentError" or any(
        word in lowered for word in ("shape", "size", "dimension", "dtype", "incompatible")
    ):
        return BadRequest(f"the model rejected the input: {text}")
    return UpstreamError("the embedded model failed while running the request")
