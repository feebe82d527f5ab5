"""TF Serving's Prometheus metrics, as its exporter names them.

TF Serving registers `/tensorflow/serving/request_count` (labels model_name, status) and
`/tensorflow/serving/request_latency` (microseconds; labels model_name, API, entrypoint; buckets
Exponential(10, 1.8, 33)) in servables/tensorflow/util.cc; its Prometheus exporter turns '/' into
':'. Latency is recorded for successful requests only (prediction_service_impl.cc); the count for
every request, labelled with the status code's name.

With --enable_batching, batching/batching_session.cc adds
`/tensorflow/serving/batching_session/queuing_latency` (microseconds from a task's enqueue to its
batch being picked up; buckets Exponential(100, 1.2, 52); label thread_pool_name, which the model
server's CreateBatchingSession leaves empty, so Prometheus stores the series without it).
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS_US = [10 * 1.8**i for i in range(33)]
QUEUING_BUCKETS_US = [100 * 1.2**i for i in range(52)]


def _bucket_index(bounds: list[float], value: float) -> int:
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def _histogram_lines(
    name: str,
    bounds: list[float],
    base: tuple[tuple[str, str], ...],
    buckets: list[int],
    total: float,
) -> list[str]:
    """NAME_bucket{..., le} (cumulative, last le="+Inf"), NAME_sum, NAME_count, as the exporter."""
    lines = []
    cumulative = 0
    for bound, count in zip([*bounds, float("inf")], buckets, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else f"{bound:.6g}"
        lines.append(f"{name}_bucket{{{_labels((*base, ('le', le)))}}} {cumulative}")
    lines.append(f"{name}_sum{{{_labels(base)}}} {total:.0f}")
    lines.append(f"{name}_count{{{_labels(base)}}} {cumulative}")
    return lines


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in pairs)


class ServingMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._latency: dict[tuple[str, str, str], list[int]] = {}
        self._latency_sum: dict[tuple[str, str, str], float] = defaultdict(float)
        self._queuing: dict[str, list[int]] = {}
        self._queuing_sum: dict[str, float] = defaultdict(float)

    def record_queuing(self, micros: float, thread_pool_name: str = "") -> None:
        """One task's wait in the batching queue (only recorded with --enable_batching)."""
        with self._lock:
            buckets = self._queuing.setdefault(
                thread_pool_name, [0] * (len(QUEUING_BUCKETS_US) + 1)
            )
            buckets[_bucket_index(QUEUING_BUCKETS_US, micros)] += 1
            self._queuing_sum[thread_pool_name] += micros

    def record(
        self, model: str, status: str, api: str, entrypoint: str, micros: float | None
    ) -> None:
        with self._lock:
            self._counts[(model, status)] += 1
            if status != "OK" or micros is None:
                return
            key = (model, api, entrypoint)
            buckets = self._latency.setdefault(key, [0] * (len(BUCKETS_US) + 1))
            buckets[_bucket_index(BUCKETS_US, micros)] += 1
            self._latency_sum[key] += micros

    def render(self) -> str:
        lines = ["# TYPE :tensorflow:serving:request_count counter"]
        with self._lock:
            for (model, status), count in sorted(self._counts.items()):
                labels = _labels((("model_name", model), ("status", status)))
                lines.append(f":tensorflow:serving:request_count{{{labels}}} {count}")
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            for (model, api, entrypoint), buckets in sorted(self._latency.items()):
                base = (("model_name", model), ("API", api), ("entrypoint", entrypoint))
                total = self._latency_sum[(model, api, entrypoint)]
                lines += _histogram_lines(
                    ":tensorflow:serving:request_latency", BUCKETS_US, base, buckets, total
                )
            if self._queuing:
                name = ":tensorflow:serving:batching_session:queuing_latency"
                lines.append(f"# TYPE {name} histogram")
                for pool, buckets in sorted(self._queuing.items()):
                    total = self._queuing_sum[pool]
                    base = (("thread_pool_name", pool),)
                    lines += _histogram_lines(name, QUEUING_BUCKETS_US, base, buckets, total)
        return "\n".join(lines) + "\n"
