"""Per-model counters with Triton's meanings, reported in each endpoint's $SRV.STATS data.

A *request* is one message; an *inference* is one request computed; an *execution* is one engine
call (a batch). Queue time runs from arrival to dispatch, compute time is the engine call.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any, Final

import numpy as np

RECENT: Final = 1024  # percentiles cover this many recent samples


class ModelStats:
    """Updated from the event loop and from engine threads, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.request_count = 0
        self.success_count = 0
        self.inference_count = 0
        self.execution_count = 0
        self.batched_rows = 0
        self.queue_ns = 0
        self.compute_ns = 0
        self.errors_by_code: Counter[int] = Counter()
        self.dropped_count = 0  # never answered: the reply subject was refused
        self._recent_queue_ns: deque[int] = deque(maxlen=RECENT)
        self._recent_compute_ns: deque[int] = deque(maxlen=RECENT)

    def request_done(self, error_code: int | None) -> None:
        with self._lock:
            self.request_count += 1
            if error_code is None:
                self.success_count += 1
            else:
                self.errors_by_code[error_code] += 1

    def dropped(self) -> None:
        with self._lock:
            self.dropped_count += 1

    def queued(self, waited_ns: int) -> None:
        with self._lock:
            self.queue_ns += waited_ns
            self._recent_queue_ns.append(waited_ns)

    def executed(self, requests: int, rows: int, compute_ns: int) -> None:
        with self._lock:
            self.execution_count += 1
            self.inference_count += requests
            self.batched_rows += rows
            self.compute_ns += compute_ns
            self._recent_compute_ns.append(compute_ns)

    def snapshot(self, pending: int) -> dict[str, Any]:
        with self._lock:
            executions = self.execution_count
            return {
                "request_count": self.request_count,
                "success_count": self.success_count,
                "failure_count": self.request_count - self.success_count,
                "inference_count": self.inference_count,
                "execution_count": executions,
                "batch_rows": self.batched_rows,
                "mean_batch_size": self.batched_rows / executions if executions else 0.0,
                "queue_ns": self.queue_ns,
                "compute_ns": self.compute_ns,
                "queue_ms": _percentiles(self._recent_queue_ns),
                "compute_ms": _percentiles(self._recent_compute_ns),
                "errors_by_code": {str(c): n for c, n in sorted(self.errors_by_code.items())},
                "pending": pending,
                "dropped_count": self.dropped_count,
            }


def _percentiles(samples: deque[int]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(np.fromiter(samples, dtype=np.int64), [50, 90, 99]) / 1e6
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}
