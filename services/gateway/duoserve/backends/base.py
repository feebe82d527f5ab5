"""The one small async interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Any, ClassVar

from duoserve.resilience import Deadline
from duoserve.tensors import InferenceRequest, InferenceResponse
from duoserve.tracing import CallSpan


class Backend(ABC):
    """A server (or in-process runtime) that runs models.

    ``request.model`` and ``request.version`` are the backend's own names for the model (the
    router rewrites them from the route); ``request.framework`` is the route's framework.
    Implementations raise :mod:`duoserve.errors` types:
    BadRequest when the backend rejected the input, NotFound for an unknown model/version,
    Unavailable when it could not take the call (refused, queue full: safe to retry),
    UpstreamTimeout past the deadline, UpstreamError for anything else it answered.
    """

    kind: ClassVar[str]
    call_span: CallSpan = CallSpan("infer")
    """How its calls appear in a trace (remote backends name their protocol's call)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook, most backends need none
        """Open pools, load models. Called once when the app starts."""

    @abstractmethod
    async def infer(
        self, request: InferenceRequest, deadline: Deadline, *, avoid: Collection[str] = ()
    ) -> InferenceResponse:
        """Run one inference before the deadline.

        ``request.trace``, when set, is the W3C trace context the call carries (HTTP headers
        or gRPC metadata); the backend notes there the replica it called and the status of
        its answer, for the call's span.

        ``avoid``: replicas (``error.endpoint`` of earlier attempts) that failed this request;
        a backend with several replicas calls another one when it can."""

    def healthy_elsewhere(self, endpoint: str | None) -> bool:
        """Whether a replica other than ``endpoint`` is healthy, so that a failure there says
        nothing about the backend as a whole (its circuit breaker then ignores it). A backend
        with one replica has nowhere else: False."""
        return False

    @abstractmethod
    async def ready(
        self, model: str, version: str | None = None, *, framework: str | None = None
    ) -> bool:
        """Whether the backend can serve this model now. Never raises.

        ``framework`` matters only to backends that hold both frameworks (embedded)."""

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """The backend's own description of the model (free-form), for diagnostics."""
        return {}

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads and models."""
