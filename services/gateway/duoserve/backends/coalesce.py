"""Adaptive coalescing of concurrent requests into one call to a remote backend.

Behind the gateway a batching server (TorchServe's batcher, TF Serving's, Triton's dynamic
batcher) sees requests spread out in time, one call each, and fills smaller batches than when
clients call it directly; every call also costs the gateway an HTTP exchange and an encode and
decode. With ``coalesce`` set on a remote backend in models.yaml, requests of the same model and
version are combined:

- a request goes out at once, alone (in its own task, as without coalescing), while fewer than
  ``max_calls_in_flight`` calls per replica in rotation are out for its (model, version) and
  none is queued; otherwise it queues (so the limit grows and shrinks with the replica set:
  three replicas take three times the calls of one, and a replica that joins the rotation
  takes queued requests at once, ``pump_all``);
- when a call returns (or ``max_delay_ms`` after the oldest queued request, when that is set),
  the queued requests that are alike go out together as one call of at most
  ``max_batch_size`` rows: inputs concatenated along the first dimension, outputs split back
  by each request's row count;
- only requests with the same model, version, framework, input names, datatypes and non-batch
  dimensions, requested outputs and parameters are combined;
- an error of a combined call reaches every request in it, each as its own copy of the error,
  so the data plane's retries, failover and circuit breaker see what they would have seen of
  that request's own call;
- each request keeps its own deadline: one that passes while the request waits in the queue or
  in a combined call gives that request its timeout, and the others go on; a waiter that is
  cancelled (its client left) is dropped, and a call whose every waiter left is cancelled.

A retry (a request that must avoid replicas) and a request that cannot be combined (a scalar
input, inputs whose first dimensions differ) are sent on their own, at once. Rows per call are
in ``duoserve_backend_batch_rows``.

This is the embedded backend's :class:`~duoserve.backends.embedded.MicroBatcher` idea for remote
calls, with the differences a remote call needs: several calls in flight, per-request deadlines,
requests of different shapes side by side in one queue, errors that must stay per request.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import numpy as np

from duoserve.config import CoalesceConfig
from duoserve.errors import Unavailable, UpstreamError, UpstreamTimeout
from duoserve.metrics import Metrics
from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse, Tensor

log = logging.getLogger(__name__)

Call = Callable[[InferenceRequest, Deadline], Awaitable[InferenceResponse]]


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for JSON-like parameters, equal when the values are equal."""
    if isinstance(value, dict):
        return ("{", tuple(sorted((str(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("[", tuple(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("?", repr(value))
    return (type(value).__name__, value)


def combinable_rows(request: InferenceRequest) -> int | None:
    """The request's rows when it can be combined with others (every input has the same first
    dimension, at least one row); None when it cannot (no inputs, a scalar input, first
    dimensions that differ)."""
    rows = -1
    for tensor in request.inputs:
        shape = tensor.data.shape
        if not shape or (rows >= 0 and shape[0] != rows):
            return None
        rows = int(shape[0])
    return rows if rows > 0 else None


def signature(request: InferenceRequest) -> Hashable:
    """What a combinable request must share with others to be combined with them: its inputs'
    names, datatypes, shapes past the first dimension and parameters, its requested outputs
    and its parameters. Computed only for a request that queues."""
    inputs = tuple(
        (t.name, t.datatype, t.data.shape[1:], _freeze(t.parameters)) for t in request.inputs
    )
    outputs = (
        None
        if request.outputs is None
        else tuple((o.name, _freeze(o.parameters)) for o in request.outputs)
    )
    return inputs, outputs, _freeze(request.parameters)


class _Waiter:
    """One request waiting for its answer."""

    __slots__ = ("request", "deadline", "signature", "rows", "arrived", "future", "batch")

    def __init__(
        self,
        request: InferenceRequest,
        deadline: Deadline,
        key: Hashable,
        rows: int,
        arrived: float,
        future: asyncio.Future[InferenceResponse],
    ) -> None:
        self.request = request
        self.deadline = deadline
        self.signature = key
        self.rows = rows
        self.arrived = arrived
        self.future = future
        self.batch: _Batch | None = None


class _Batch:
    """Requests sent as one call, and the task that sends it."""

    __slots__ = ("waiters", "task")

    def __init__(self, waiters: list[_Waiter]) -> None:
        self.waiters = waiters
        self.task: asyncio.Task[None] | None = None


class _Group:
    """The requests of one (model, version, framework): its calls in flight and its queue."""

    __slots__ = ("in_flight", "queue", "timer")

    def __init__(self) -> None:
        self.in_flight = 0
        self.queue: list[_Waiter] = []
        self.timer: asyncio.TimerHandle | None = None


class Coalescer:
    """Combines a backend's concurrent requests into fewer calls (see the module's text).

    ``call(request, deadline)`` makes one call to the backend (a replica picked for it)."""

    def __init__(
        self,
        backend: str,
        config: CoalesceConfig,
        call: Call,
        metrics: Metrics,
        what: str,
        replicas: Callable[[], int] = lambda: 1,
    ) -> None:
        """``replicas()``: how many replicas are in rotation now (each takes
        ``max_calls_in_flight`` calls)."""
        self._replicas = replicas
        self.max_rows = config.max_batch_size
        self.max_delay_s = config.max_delay_ms / 1000
        self.max_calls = config.max_calls_in_flight
        self.what = what
        self._call = call
        self._rows = metrics.backend_batch_rows.labels(backend)
        self._groups: dict[tuple[str, str | None, str | None], _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def infer(self, request: InferenceRequest, deadline: Deadline) -> InferenceResponse:
        rows = combinable_rows(request)
        if rows is None or self._closed:
            self._rows.observe(request.batch_size())
            return await self._call(request, deadline)
        loop = asyncio.get_running_loop()
        group_key = (request.model, request.version, request.framework)
        group = self._groups.get(group_key)
        if group is None:
            group = self._groups[group_key] = _Group()
        if (
            not group.queue
            and group.in_flight < self._limit()
            and (self.max_delay_s == 0 or rows >= self.max_rows)
        ):
            # Nothing to wait for: the call is made in this request's own task, as without
            # coalescing (no future, task or timer: what low load pays for the option).
            group.in_flight += 1
            self._rows.observe(rows)
            try:
                return await self._call(request, deadline)
            finally:
                group.in_flight -= 1
                if not self._closed:
                    self._pump(group_key, group)
        waiter = _Waiter(
            request, deadline, signature(request), rows, loop.time(), loop.create_future()
        )
        group.queue.append(waiter)
        self._pump(group_key, group)
        try:
            async with asyncio.timeout(deadline.remaining()):
                return await waiter.future
        except TimeoutError:
            self._drop(waiter)
            raise UpstreamTimeout(
                f"the {self.what} backend did not answer within the deadline "
                f"({deadline.budget_s * 1000:.0f} ms)"
            ) from None
        except asyncio.CancelledError:
            self._drop(waiter)
            raise

    def pump_all(self) -> None:
        """Send what every group's limit lets out now (called when a replica joins the
        rotation: the limit grew, and queued requests would otherwise wait for a call to
        return)."""
        if self._closed:
            return
        for group_key, group in list(self._groups.items()):
            self._pump(group_key, group)

    def _limit(self) -> int:
        """Calls a group may have out now: max_calls_in_flight per replica in rotation."""
        return self.max_calls * max(1, self._replicas())

    def _drop(self, waiter: _Waiter) -> None:
        """A waiter that gave up: out of the queue (lazily), and its call cancelled when no
        one else waits for it."""
        if not waiter.future.done():
            waiter.future.cancel()
        batch = waiter.batch
        if (
            batch is not None
            and batch.task is not None
            and not batch.task.done()
            and all(w.future.done() for w in batch.waiters)
        ):
            batch.task.cancel()

    def _pump(self, group_key: tuple[str, str | None, str | None], group: _Group) -> None:
        """Send what may go now: while a call slot is free, the oldest queued request with the
        requests alike queued after it, up to max_batch_size rows."""
        loop = asyncio.get_running_loop()
        limit = self._limit()
        # Filtered once: nothing here yields, so no waiter gives up while the queue is split.
        queue = [w for w in group.queue if not w.future.done()]
        while group.in_flight < limit:
            if not queue:
                group.queue = queue
                break
            first = queue[0]
            batch, rest, rows = [first], [], first.rows
            for waiter in queue[1:]:
                if waiter.signature == first.signature and rows + waiter.rows <= self.max_rows:
                    batch.append(waiter)
                    rows += waiter.rows
                else:
                    rest.append(waiter)
            if self.max_delay_s > 0 and rows < self.max_rows:
                due = first.arrived + self.max_delay_s
                if loop.time() < due:
                    group.queue = queue
                    if group.timer is None:
                        group.timer = loop.call_at(due, self._on_timer, group_key, group)
                    return
            group.queue = queue = rest
            self._launch(group_key, group, batch, rows)
        if not group.in_flight and not group.queue and self._groups.get(group_key) is group:
            if group.timer is not None:
                group.timer.cancel()
            del self._groups[group_key]

    def _on_timer(self, group_key: tuple[str, str | None, str | None], group: _Group) -> None:
        group.timer = None
        self._pump(group_key, group)

    def _launch(
        self,
        group_key: tuple[str, str | None, str | None],
        group: _Group,
        waiters: list[_Waiter],
        rows: int,
    ) -> None:
        group.in_flight += 1
        batch = _Batch(waiters)
        for waiter in waiters:
            waiter.batch = batch
        self._rows.observe(rows)
        task = asyncio.get_running_loop().create_task(self._run(group_key, group, batch))
        batch.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, group_key: tuple[str, str | None, str | None], group: _Group, batch: _Batch
    ) -> None:
        waiters = batch.waiters
        try:
            if len(waiters) == 1:
                answers = [await self._call(waiters[0].request, waiters[0].deadline)]
            else:
                merged, deadline = combine(waiters)
                response = await self._call(merged, deadline)
                answers = split(response, waiters, self.what)
        except asyncio.CancelledError:
            # Every waiter left (or the backend is closing): nothing to hand out but that.
            _fail(waiters, Unavailable(f"the {self.what} backend is shut down", reason="closed"))
            raise
        except BaseException as error:  # noqa: BLE001 - handed to every waiter as its own
            _fail(waiters, error)
        else:
            for waiter, answer in zip(waiters, answers, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(answer)
        finally:
            group.in_flight -= 1
            if not self._closed:
                self._pump(group_key, group)

    async def close(self) -> None:
        """Fail what is queued and stop the combined calls in flight (a call made in its
        request's own task ends as the backend's connections close)."""
        self._closed = True
        closed = Unavailable(f"the {self.what} backend is shut down", reason="closed")
        for group in self._groups.values():
            if group.timer is not None:
                group.timer.cancel()
            _fail(group.queue, closed)
            group.queue = []
        self._groups.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _fail(waiters: list[_Waiter], error: BaseException) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_exception(_own_copy(error))


def _own_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` per waiter: the data plane sets attributes on the error it handles
    (its route), and one exception object raised in several tasks would share a traceback."""
    try:
        twin = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied is shared instead
        return error
    twin.__cause__ = error.__cause__
    return twin


def combine(waiters: list[_Waiter]) -> tuple[InferenceRequest, Deadline]:
    """One request holding every waiter's rows, in order, and a deadline that lets the last
    of them finish (each waiter still gives up at its own)."""
    first = waiters[0].request
    inputs = [
        Tensor(
            tensor.name,
            np.concatenate([w.request.inputs[i].data for w in waiters]),
            tensor.datatype,
            tensor.parameters,
        )
        for i, tensor in enumerate(first.inputs)
    ]
    merged = InferenceRequest(
        model=first.model,
        inputs=inputs,
        version=first.version,
        outputs=first.outputs,
        parameters=first.parameters,
        framework=first.framework,
        # The combined call carries the first request's trace context: the backend sees one
        # call, and one trace shows it (the others' call spans record no replica).
        trace=first.trace,
    )
    # The latest deadline of the requests in it (a Deadline is never changed once made).
    return merged, max((w.deadline for w in waiters), key=lambda d: d.expires_at)


def split(
    response: InferenceResponse, waiters: list[_Waiter], what: str
) -> list[InferenceResponse]:
    """Each waiter's rows of a combined answer; UpstreamError when an output does not have one
    row per input row (the model does not answer row for row: coalescing does not fit it)."""
    total = sum(w.rows for w in waiters)
    for tensor in response.outputs:
        if tensor.data.ndim == 0 or tensor.data.shape[0] != total:
            shape = list(tensor.data.shape)
            log.warning(
                "%s answered output '%s' with shape %s to a combined call of %d rows; "
                "turn coalesce off for this backend",
                what,
                tensor.name,
                shape,
                total,
            )
            raise UpstreamError(
                f"the {what} backend's answer to a combined call does not have one row per "
                f"request row (output '{tensor.name}')"
            )
    answers = []
    start = 0
    for waiter in waiters:
        end = start + waiter.rows
        answers.append(
            InferenceResponse(
                model_name=response.model_name,
                outputs=[
                    Tensor(t.name, t.data[start:end], t.datatype, dict(t.parameters))
                    for t in response.outputs
                ],
                model_version=response.model_version,
                id=waiter.request.id,
                parameters=dict(response.parameters),
            )
        )
        start = end
    return answers
