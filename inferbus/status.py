"""``inferbus status``: the cluster at a glance, from the workers' $SRV.INFO and $SRV.STATS.

Every worker answers both; figures per model are summed over its workers. Rates need two
looks: ``rates`` compares a snapshot with the previous one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from inferbus.contract import service_subject
from inferbus.pipeline.client import Client
from inferbus.pipeline.discovery import gather

_COUNTERS = ("request_count", "failure_count", "inference_count", "execution_count",
             "batch_rows", "queue_ns", "compute_ns")  # fmt: skip


@dataclass(slots=True)
class WorkerRow:
    id: str
    host: str
    pid: str
    uptime_s: float
    models: list[str]
    engines: list[str]
    devices: list[str]


@dataclass(slots=True)
class ModelRow:
    name: str
    version: str
    workers: int
    requests: int
    errors: int
    errors_by_code: dict[str, int]
    mean_batch_size: float
    queue_ms: float
    compute_ms: float
    pending: int
    requests_per_s: float = 0.0
    unhealthy: list[str] = field(default_factory=list)  # reasons, one per unfit worker


@dataclass(slots=True)
class ClusterStatus:
    taken: float
    workers: list[WorkerRow] = field(default_factory=list)
    models: list[ModelRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Reading what workers report: their JSON is read, never trusted. A field of the wrong type
# counts as absent, so one odd worker (or a hostile one on a shared bus) cannot stop a view.


def as_number(value: object) -> float:
    """A reported figure: a finite JSON number, else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        number = float(value)
    except OverflowError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def as_text(value: object) -> str:
    """A reported name: a string as it is, a number written out, anything else ``?``."""
    if isinstance(value, str):
        return value
    return "?" if isinstance(value, bool) or not isinstance(value, int | float) else str(value)


def as_object(value: object) -> dict[str, Any]:
    """A reported JSON object, or an empty one in its place."""
    return value if isinstance(value, dict) else {}


def as_objects(value: object) -> list[dict[str, Any]]:
    """The objects in a reported JSON list (a worker's endpoints); none when it is no list."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _uptime(started: object, now: datetime) -> float:
    if not isinstance(started, str) or not started:
        return 0.0
    try:
        when = datetime.strptime(started.rstrip("Z")[:26], "%Y-%m-%dT%H:%M:%S.%f")
    except ValueError:
        return 0.0
    return max((now - when.replace(tzinfo=UTC)).total_seconds(), 0.0)


async def snapshot(client: Client, timeout: float = 0.5) -> ClusterStatus:
    infos = await gather(client.nats, service_subject("INFO"), timeout=timeout)
    stats = await gather(client.nats, service_subject("STATS"), timeout=timeout)
    return cluster_status(infos, stats)


def cluster_status(infos: list[dict[str, Any]], stats: list[dict[str, Any]]) -> ClusterStatus:
    """Workers and models from the workers' ``$SRV.INFO`` and ``$SRV.STATS`` replies; a reply
    without an id, or a field of the wrong type, is left out."""
    now = datetime.now(UTC)
    started = {s["id"]: s.get("started") for s in as_objects(stats) if isinstance(s.get("id"), str)}
    rows = [_worker_row(info, started, now) for info in as_objects(infos)]
    workers = sorted((row for row in rows if row is not None), key=lambda w: (w.host, w.id))
    return ClusterStatus(taken=now.timestamp(), workers=workers, models=model_rows(stats))


def _worker_row(
    info: dict[str, Any], started: Mapping[str, object], now: datetime
) -> WorkerRow | None:
    """One worker from its ``$SRV.INFO`` reply; None when the reply names no worker."""
    worker = info.get("id")
    if not isinstance(worker, str):
        return None
    metadata = as_object(info.get("metadata"))
    endpoints = [as_object(e.get("metadata")) for e in as_objects(info.get("endpoints"))]
    versioned = [m for m in endpoints if isinstance(m.get("model"), str) and m["model"]]
    return WorkerRow(
        id=worker,
        host=as_text(metadata.get("host")),
        pid=as_text(metadata.get("pid")),
        uptime_s=_uptime(started.get(worker), now),
        models=sorted({f"{m['model']} v{as_text(m.get('version'))}" for m in versioned}),
        engines=sorted({as_text(m.get("engine")) for m in versioned}),
        devices=sorted({as_text(m.get("device")) for m in versioned}),
    )


def model_rows(stats: list[dict[str, Any]]) -> list[ModelRow]:
    """One row per model version, summed over workers; each version's data is read from its
    versioned endpoint only (the unversioned one shares the same counters)."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for reply in as_objects(stats):
        for name, version, data in _versioned_data(reply):
            row = totals.setdefault((name, version), {"workers": 0, "codes": {}, "unfit": [],
                                    **dict.fromkeys((*_COUNTERS, "pending"), 0)})  # fmt: skip
            _add_worker(row, as_text(reply.get("id")), data)
    return [_row(name, version, row) for (name, version), row in sorted(totals.items())]


def _versioned_data(reply: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(model, version, data) per versioned endpoint: the subject decides, being
    ``inferbus.infer.<model>.<version>`` (an endpoint's name can mislead)."""
    for endpoint in as_objects(reply.get("endpoints")):
        tokens = as_text(endpoint.get("subject")).split(".")
        data = endpoint.get("data")
        if len(tokens) == 4 and tokens[3].isdigit() and isinstance(data, dict):
            yield tokens[2], tokens[3], data


def _add_worker(row: dict[str, Any], worker: str, data: dict[str, Any]) -> None:
    """One worker's figures for a model version added to its row."""
    health = as_text(data.get("health", "ready"))
    if health != "ready":
        row["unfit"].append(f"{worker}: {health}")
    row["workers"] += 1
    for key in (*_COUNTERS, "pending"):
        row[key] += int(as_number(data.get(key)))
    for code, count in as_object(data.get("errors_by_code")).items():
        row["codes"][code] = row["codes"].get(code, 0) + int(as_number(count))


def _ratio(numerator: float, denominator: float, scale: float = 1.0) -> float:
    return numerator / denominator / scale if denominator else 0.0


def derived(counters: Mapping[str, float]) -> dict[str, float]:
    """Mean batch size, queue ms per inference and compute ms per execution from the summed
    (or differenced) ``$SRV.STATS`` counters; ``inferbus bench`` reads them the same way."""
    return {
        "mean_batch_size": _ratio(counters["batch_rows"], counters["execution_count"]),
        "queue_ms": _ratio(counters["queue_ns"], counters["inference_count"], 1e6),
        "compute_ms": _ratio(counters["compute_ns"], counters["execution_count"], 1e6),
    }


def _row(name: str, version: str, row: dict[str, Any]) -> ModelRow:
    return ModelRow(
        name=name,
        version=version,
        workers=row["workers"],
        requests=row["request_count"],
        errors=row["failure_count"],
        errors_by_code=row["codes"],
        pending=row["pending"],
        unhealthy=row["unfit"],
        **derived(row),
    )


def rates(current: ClusterStatus, previous: ClusterStatus | None) -> None:
    """Fill in requests/s from the change since ``previous``."""
    if previous is None:
        return
    seconds = max(current.taken - previous.taken, 1e-6)
    before = {(m.name, m.version): m.requests for m in previous.models}
    for model in current.models:
        done = model.requests - before.get((model.name, model.version), model.requests)
        model.requests_per_s = max(done, 0) / seconds


def render(status: ClusterStatus) -> str:
    lines = [
        f"inferbus cluster: {len(status.workers)} worker(s), {len(status.models)} model version(s)",
        "",
    ]
    lines.append(f"{'worker':24} {'host':16} {'pid':>7} {'uptime':>9}  models (engine on device)")
    for w in status.workers:
        where = f"({'/'.join(w.engines)} on {'/'.join(w.devices)})"
        lines.append(f"{w.id[:24]:24} {w.host[:16]:16} {w.pid:>7} {w.uptime_s:>8.0f}s  "
                     f"{', '.join(w.models)} {where}")  # fmt: skip
    lines += ["", f"{'model':20} {'workers':>7} {'req/s':>8} {'requests':>9} {'errors':>7} "
                  f"{'batch':>6} {'queue ms':>9} {'compute ms':>10} {'pending':>7}"]  # fmt: skip
    for m in status.models:
        lines.append(f"{m.name + ' v' + m.version:20} {m.workers:>7} {m.requests_per_s:>8.1f} "
                     f"{m.requests:>9} {m.errors:>7} {m.mean_batch_size:>6.1f} {m.queue_ms:>9.2f} "
                     f"{m.compute_ms:>10.2f} {m.pending:>7}")  # fmt: skip
        lines += [f"  ! {reason}" for reason in m.unhealthy]
    return "\n".join(lines)
