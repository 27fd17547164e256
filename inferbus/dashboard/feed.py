"""What the dashboard shows, once a second: the cluster from the workers' ``$SRV.INFO`` and
``$SRV.STATS`` (one gather of each), with request rates from the change since the last frame.

A frame is plain JSON, sent to the page as a server-sent event; the page keeps the history for
its charts, so a frame carries only the present.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

from nats.aio.client import Client as NatsClient

from inferbus.contract import service_subject
from inferbus.pipeline.discovery import gather
from inferbus.status import ClusterStatus, cluster_status, rates
from inferbus.tenancy.usage import to_json, usage_by_user, versioned_endpoint

INTERVAL_S: Final = 1.0
GATHER_S: Final = 0.25  # how long each look waits for the workers' answers


def percentiles(stats: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The worst recent compute and queue p50/p99 (ms) over the workers, per
    ``<model> v<version>`` (from each version's versioned endpoint)."""
    worst: dict[str, dict[str, float]] = {}
    for reply in stats:
        for endpoint in reply.get("endpoints") or []:
            model, data = versioned_endpoint(endpoint), endpoint.get("data")
            if model is None or not isinstance(data, dict):
                continue
            row = worst.setdefault(model, {})
            for kind in ("compute_ms", "queue_ms"):
                for point in ("p50", "p99"):
                    value = float((data.get(kind) or {}).get(point, 0.0))
                    key = f"{kind[:-3]}_{point}_ms"
                    row[key] = max(row.get(key, 0.0), value)
    return worst


def frame(status: ClusterStatus, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """One update for the page."""
    latency = percentiles(stats)
    body = status.to_dict()
    for model in body["models"]:
        model.update(latency.get(f"{model['name']} v{model['version']}", {}))
    body["users"] = to_json(usage_by_user(stats))
    return body


async def frames(nats: NatsClient, interval: float = INTERVAL_S) -> AsyncIterator[dict[str, Any]]:
    """Frames, one per ``interval``, for as long as the caller reads them."""
    previous: ClusterStatus | None = None
    while True:
        infos = await gather(nats, service_subject("INFO"), timeout=GATHER_S)
        stats = await gather(nats, service_subject("STATS"), timeout=GATHER_S)
        status = cluster_status(infos, stats)
        rates(status, previous)
        previous = status
        yield frame(status, stats)
        await asyncio.sleep(max(interval - 2 * GATHER_S, 0.0))
