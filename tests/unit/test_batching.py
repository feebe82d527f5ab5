"""Embedded micro-batching: concurrent requests merged into one forward pass must answer exactly
as they would alone; a failing batch fails each of its waiters; a cancelled waiter is dropped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from duoserve.backends.embedded import EmbeddedBackend, MicroBatcher, TorchScriptRuntime
from duoserve.config import EmbeddedBackendConfig, TensorSpec
from duoserve.errors import BadRequest, UpstreamError
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, Tensor
from tests.timing import eventually

ROWS = [1, 3, 2, 7, 1, 5, 4, 1]
PIXELS = [TensorSpec(name="pixels", datatype="FP32", shape=[-1, 8, 8])]
PROBS = [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])]


class CountingModel:
    """A deterministic row-wise 'model' that records the batch sizes it was called with."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.entered = 0  # calls begun (a gated call is counted while it waits on the gate)
        self.gate = gate
        self.weights = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered += 1
        if self.gate is not None:
            self.gate.wait(5)
        x = inputs["x"]
        self.batches.append(int(x.shape[0]))
        return {"y": np.tanh(x @ self.weights), "rowsum": x.sum(axis=1)}


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown(wait=True)


def _inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)}


async def test_concurrent_requests_of_different_sizes_get_their_own_rows(
    executor: ThreadPoolExecutor,
) -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, executor, max_batch_size=64, max_delay_s=0.02)
    requests = [_inputs(rows, seed) for seed, rows in enumerate(ROWS)]
    try:
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        await batcher.close()
    assert len(model.batches) < len(requests), "nothing was batched"
    for request, answer in zip(requests, answers, strict=True):
        alone = CountingModel()(request)
        assert answer.keys() == alone.keys()
        for name in alone:
            np.testing.assert_allclose(answer[name], alone[name], rtol=0, atol=1e-6)


async def test_requests_queued_behind_a_busy_model_join_the_next_batch_even_without_delay(
    executor: ThreadPoolExecutor,
) -> None:
    gate = threading.Event()
    model = CountingModel(gate)
    batcher = MicroBatcher(model, executor, max_batch_size=64, max_delay_s=0.0)
    first = asyncio.ensure_future(batcher.submit(_inputs(1, 0)))
    await eventually(lambda: model.entered == 1, "the first batch running, held at the gate")
    rest = [asyncio.ensure_future(batcher.submit(_inputs(2, s))) for s in range(1, 6)]
    await eventually(lambda: batcher._queue.qsize() == 5, "the other five queued")
    gate.set()
    try:
        await asyncio.gather(first, *rest)
    finally:
        await batcher.close()
    assert model.batches == [1, 10]


async def test_a_failing_batch_fails_every_waiter_and_the_next_batch_still_runs(
    executor: ThreadPoolExecutor,
) -> None:
    calls = {"n": 0}

    def flaky(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return {"y": inputs["x"] * 2}

    batcher = MicroBatcher(flaky, executor, max_batch_size=64, max_delay_s=0.02)
    try:
        outcomes = await asyncio.gather(
            *(batcher.submit(_inputs(r, r)) for r in (1, 2, 3)), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) and str(o) == "device lost" for o in outcomes)
        again = await batcher.submit(_inputs(2, 9))
    finally:
        await batcher.close()
    np.testing.assert_array_equal(again["y"], _inputs(2, 9)["x"] * 2)


async def test_a_cancelled_waiter_does_not_break_the_others(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = CountingModel(gate)
    batcher = MicroBatcher(model, executor, max_batch_size=64, max_delay_s=0.01)
    try:
        busy = asyncio.ensure_future(batcher.submit(_inputs(1, 0)))
        await eventually(lambda: model.entered == 1, "the busy batch held at the gate")
        queued = [asyncio.ensure_future(batcher.submit(_inputs(r, r))) for r in (2, 3, 4)]
        await eventually(lambda: batcher._queue.qsize() == 3, "three queued behind it")
        queued[1].cancel()  # gives up while waiting for the busy model
        gate.set()
        done = await asyncio.gather(busy, queued[0], queued[2])
        with pytest.raises(asyncio.CancelledError):
            await queued[1]
        # Cancelled while its own batch runs: the others of that batch still get answers.
        gate.clear()
        running = [asyncio.ensure_future(batcher.submit(_inputs(r, 10 + r))) for r in (1, 2)]
        # busy, then the queued batch, then these two together, held at the gate.
        await eventually(lambda: model.entered == 3, "their batch running")
        running[0].cancel()
        gate.set()
        survivor = await running[1]
    finally:
        gate.set()
        await batcher.close()
    for (rows, seed), answer in zip([(1, 0), (2, 2), (4, 4)], done, strict=True):
        np.testing.assert_allclose(
            answer["y"], CountingModel()(_inputs(rows, seed))["y"], rtol=0, atol=1e-6
        )
    np.testing.assert_allclose(
        survivor["y"], CountingModel()(_inputs(2, 12))["y"], rtol=0, atol=1e-6
    )


# -- the embedded backend with the real twin models -----------------------------------------


def _backend(store: Path, max_batch_size: int) -> EmbeddedBackend:
    config = EmbeddedBackendConfig(
        kind="embedded",
        model_store=str(store),
        device="cpu",
        max_batch_size=max_batch_size,
        max_batch_delay_ms=20,
    )
    backend = EmbeddedBackend(f"b{max_batch_size}", config, store)
    for framework in ("pytorch", "tensorflow"):
        backend.register(framework, "digits", PIXELS, PROBS)
    return backend


def _request(images: np.ndarray, framework: str) -> InferenceRequest:
    return InferenceRequest(
        model="digits", inputs=[Tensor("pixels", images, "FP32")], framework=framework
    )


@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
async def test_batched_and_unbatched_backends_answer_identically(
    model_store: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    framework: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images, _ = digits_samples
    chunks, start = [], 0
    for rows in ROWS:
        chunks.append(images[start : start + rows])
        start += rows
    batch_sizes: list[int] = []
    original = TorchScriptRuntime.run

    def counting_run(self: TorchScriptRuntime, inputs: dict[str, np.ndarray], outputs: list[str]):
        batch_sizes.append(int(inputs["pixels"].shape[0]))
        return original(self, inputs, outputs)

    monkeypatch.setattr(TorchScriptRuntime, "run", counting_run)
    plain, batched = _backend(model_store, 1), _backend(model_store, 64)
    await plain.start()
    await batched.start()
    try:
        alone = [await plain.infer(_request(c, framework), Deadline(30)) for c in chunks]
        batch_sizes.clear()
        together = await asyncio.gather(
            *(batched.infer(_request(c, framework), Deadline(30)) for c in chunks)
        )
    finally:
        await plain.close()
        await batched.close()
    if framework == "pytorch":
        assert len(batch_sizes) < len(chunks), "the batched backend never merged requests"
    for one, merged, chunk in zip(alone, together, chunks, strict=True):
        a = one.output("probabilities")
        b = merged.output("probabilities")
        assert a is not None and b is not None
        assert b.data.shape == (len(chunk), 10)
        np.testing.assert_allclose(b.data, a.data, rtol=0, atol=1e-6)


async def test_a_model_failure_reaches_every_waiter_of_the_batch_as_its_error(
    model_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: TorchScriptRuntime, inputs: dict[str, np.ndarray], outputs: list[str]):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(TorchScriptRuntime, "run", broken)
    backend = _backend(model_store, 64)
    await backend.start()
    try:
        outcomes = await asyncio.gather(
            *(
                backend.infer(_request(np.zeros((r, 8, 8), np.float32), "pytorch"), Deadline(30))
                for r in (1, 2, 3)
            ),
            return_exceptions=True,
        )
    finally:
        await backend.close()
    assert all(isinstance(o, UpstreamError) for o in outcomes), outcomes
    assert not any(isinstance(o, BadRequest) for o in outcomes)
