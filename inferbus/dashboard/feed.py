"""What the dashboard shows, once a second: the cluster from the workers' ``$SRV.INFO`` and
``$SRV.STATS`` (one gather of each), with request rates from the change since the last frame.

A frame is plain JSON, sent to the page as a server-sent event; the page keeps the history for
its charts, so a frame carries only the present. Replies are read, never trusted: a malformed
one (or field) is left out, and a look that fails all the same is logged and skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any, Final

from nats.aio.client import Client as NatsClient

from inferbus.contract import service_subject
from inferbus.pipeline.discovery import gather
from inferbus.status import ClusterStatus, as_number, as_object, as_objects, cluster_status, rates
from inferbus.tenancy.usage import to_json, usage_by_user, versioned_endpoint

INTERVAL_S: Final = 1.0
GATHER_S: Final = 0.25  # how long each look waits for the workers' answers
MIN_PAUSE_S: Final = 0.05  # between looks, even when each fails at once: never a busy loop

Frame = dict[str, Any]
log = logging.getLogger("inferbus.dashboard")


def percentiles(stats: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The worst recent compute and queue p50/p99 (ms) over the workers, per
    ``<model> v<version>`` (from each version's versioned endpoint)."""
    worst: dict[str, dict[str, float]] = {}
    for reply in as_objects(stats):
        for endpoint in as_objects(reply.get("endpoints")):
            model, data = versioned_endpoint(endpoint), endpoint.get("data")
            if model is None or not isinstance(data, dict):
                continue
            row = worst.setdefault(model, {})
            for kind in ("compute_ms", "queue_ms"):
                for point in ("p50", "p99"):
                    value = as_number(as_object(data.get(kind)).get(point))
                    key = f"{kind[:-3]}_{point}_ms"
                    row[key] = max(row.get(key, 0.0), value)
    return worst


def users(stats: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Usage per user, as JSON; a reply whose usage does not read is left out whole
    (usage.py, shared with the CLI, trusts the types a worker reports)."""
    readable = []
    for reply in stats:
        try:
            usage_by_user([reply])
        except Exception:  # any surprise in one worker's figures: that worker's are left out
            continue
        readable.append(reply)
    return to_json(usage_by_user(readable))


def frame(status: ClusterStatus, stats: list[dict[str, Any]]) -> Frame:
    """One update for the page."""
    latency = percentiles(stats)
    body = status.to_dict()
    for model in body["models"]:
        model.update(latency.get(f"{model['name']} v{model['version']}", {}))
    body["users"] = users(stats)
    return body


async def frames(nats: NatsClient, interval: float = INTERVAL_S) -> AsyncGenerator[Frame, None]:
    """Frames, one per ``interval``, for as long as the caller reads them; a look that fails
    (the bus is away, a reply nothing here foresaw) is logged, and the next one tried."""
    loop = asyncio.get_running_loop()
    previous: ClusterStatus | None = None
    while True:
        began = loop.time()
        try:
            infos = await gather(nats, service_subject("INFO"), timeout=GATHER_S)
            stats = await gather(nats, service_subject("STATS"), timeout=GATHER_S)
            status = cluster_status(infos, stats)
            rates(status, previous)
            body = frame(status, stats)
        except Exception:  # one bad look must not end the feed every viewer shares
            log.warning("dashboard: a look at the cluster failed; trying again", exc_info=True)
        else:
            previous = status
            yield body
        await asyncio.sleep(max(interval - (loop.time() - began), MIN_PAUSE_S))
