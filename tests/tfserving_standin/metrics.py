"""TF Serving's Prometheus metrics, as its exporter names them.

TF Serving registers `/tensorflow/serving/request_count` (labels model_name, status) and
`/tensorflow/serving/request_latency` (microseconds; labels model_name, API, entrypoint; buckets
Exponential(10, 1.8, 33)) in servables/tensorflow/util.cc; its Prometheus exporter turns '/' into
':'. Latency is recorded for successful requests only (prediction_service_impl.cc); the count for
every request, labelled with the status code's name.
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS_US = [10 * 1.8**i for i in range(33)]


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in pairs)


class ServingMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._latency: dict[tuple[str, str, str], list[int]] = {}
        self._latency_sum: dict[tuple[str, str, str], float] = defaultdict(float)

    def record(
        self, model: str, status: str, api: str, entrypoint: str, micros: float | None
    ) -> None:
        with self._lock:
            self._counts[(model, status)] += 1
            if status != "OK" or micros is None:
                return
            key = (model, api, entrypoint)
            buckets = self._latency.setdefault(key, [0] * (len(BUCKETS_US) + 1))
            index = next((i for i, b in enumerate(BUCKETS_US) if micros <= b), len(BUCKETS_US))
            buckets[index] += 1
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
                cumulative = 0
                for bound, count in zip([*BUCKETS_US, float("inf")], buckets, strict=True):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else f"{bound:.6g}"
                    labels = _labels((*base, ("le", le)))
                    lines.append(
                        f":tensorflow:serving:request_latency_bucket{{{labels}}} {cumulative}"
                    )
                labels = _labels(base)
                total = self._latency_sum[(model, api, entrypoint)]
                lines.append(f":tensorflow:serving:request_latency_sum{{{labels}}} {total:.0f}")
                lines.append(f":tensorflow:serving:request_latency_count{{{labels}}} {cumulative}")
        return "\n".join(lines) + "\n"
