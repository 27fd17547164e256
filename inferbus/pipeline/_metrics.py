"""Prometheus metrics for a worker, with Triton's meanings under ``inferbus_`` names.

Read from the same counters as ``$SRV.STATS`` at scrape time, so the two never disagree:

| series | type | meaning |
|---|---|---|
| inferbus_request_success_total | counter | requests answered with outputs |
| inferbus_request_failure_total{code} | counter | requests answered with an error, by code |
| inferbus_inference_count_total | counter | requests computed (a batch of n counts n) |
| inferbus_execution_count_total | counter | engine calls (batches) |
| inferbus_queue_duration_us_total | counter | time requests waited for their batch |
| inferbus_compute_duration_us_total | counter | time in engine calls |
| inferbus_request_dropped_total | counter | requests dropped unanswered: reply subject refused |
| inferbus_pending_request_count | gauge | requests waiting in the queue now |
| inferbus_user_request_total{user} | counter | a user's requests answered (shared bus) |
| inferbus_user_rows_total{user} | counter | a user's rows computed (shared bus) |
| inferbus_user_compute_seconds_total{user} | counter | a user's share of engine time |
| inferbus_user_refused_total{user} | counter | a user's requests refused by grants or quotas |

Every series carries ``model`` and ``version`` labels. ``user`` is a roster user's name,
``(admin)``, or ``(other)`` for anyone else, so the label set stays bounded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LABELS = ["model", "version"]


def _counter(name: str, text: str, *extra: str) -> CounterMetricFamily:
    return CounterMetricFamily(f"inferbus_{name}", text, labels=[*LABELS, *extra])


class _Collector:
    def __init__(self, models: Callable[[], Sequence[Any]]) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        success = _counter("request_success", "Requests answered with outputs")
        failure = _counter("request_failure", "Requests answered with an error", "code")
        inference = _counter("inference_count", "Requests computed")
        execution = _counter("execution_count", "Engine calls (batches)")
        queue = _counter("queue_duration_us", "Microseconds requests waited in the queue")
        compute = _counter("compute_duration_us", "Microseconds spent in engine calls")
        dropped = _counter("request_dropped", "Requests dropped unanswered (reply subject refused)")
        pending = GaugeMetricFamily(
            "inferbus_pending_request_count", "Requests waiting in the queue", labels=LABELS
        )
        per_user = {
            "requests": _counter("user_request", "A user's requests answered", "user"),
            "rows": _counter("user_rows", "A user's rows computed", "user"),
            "compute_s": _counter("user_compute_seconds", "A user's share of engine time", "user"),
            "refused": _counter("user_refused", "A user's requests refused by policy", "user"),
        }
        for model in self.models():
            labels = [model.config.name, str(model.config.version)]
            data = model.stats_data()
            success.add_metric(labels, data["success_count"])
            for code, count in data["errors_by_code"].items():
                failure.add_metric([*labels, code], count)
            inference.add_metric(labels, data["inference_count"])
            execution.add_metric(labels, data["execution_count"])
            queue.add_metric(labels, data["queue_ns"] / 1e3)
            compute.add_metric(labels, data["compute_ns"] / 1e3)
            dropped.add_metric(labels, data["dropped_count"])
            pending.add_metric(labels, data["pending"])
            if "users" in data:
                known = model.tenancy.roster.users
                for user, row in _bounded(data["users"], known).items():
                    for field, family in per_user.items():
                        family.add_metric([*labels, user], row[field])
        yield from (success, failure, inference, execution, queue, compute, dropped, pending)
        yield from per_user.values()


def _bounded(users: Mapping[str, Mapping[str, float]], known: Mapping[str, Any]
             ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Usage rows by label: roster users and the admin by name, everyone else summed."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for user, row in users.items():
        label = user if user in known or user == "(admin)" else "(other)"
        for field, value in row.items():
            rows[label][field] += value
    return rows


class MetricsServer:
    """An HTTP endpoint serving /metrics for one worker's models (its own registry)."""

    def __init__(
        self, models: Callable[[], Sequence[Any]], port: int, host: str = "0.0.0.0"
    ) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_Collector(models))
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
