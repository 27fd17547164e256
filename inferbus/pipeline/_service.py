"""A NATS micro service (ADR-32) announcement: answers $SRV.PING, $SRV.INFO and $SRV.STATS.

The JSON shapes are nats.micro's own dataclasses, so any NATS tool reads them. The endpoint
subscriptions are the worker's, not nats.micro's: nats.micro's stop() unsubscribes, which drops
requests already delivered, while a draining worker must answer every one of them.

On a shared bus a ``Viewer`` (from the worker's tenancy) decides, per requester, which
endpoints INFO and STATS show: users discover only the models granted to them, and see only
their own usage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import (
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)
from nats.nuid import NUID


@dataclasses.dataclass(slots=True)
class EndpointRecord:
    """One subscribed subject as the service reports it, with its running counts."""

    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]
    #: the endpoint's STATS data for a viewer (None: everything, on a single-tenant worker)
    data: Callable[[str | None], dict[str, Any]] | None = None
    num_requests: int = 0
    num_errors: int = 0
    processing_time_ns: int = 0
    last_error: str = ""

    def observe(self, elapsed_ns: int, error: str | None = None) -> None:
        self.num_requests += 1
        self.processing_time_ns += elapsed_ns
        if error is not None:
            self.num_errors += 1
            self.last_error = error

    @property
    def model(self) -> str:
        return self.metadata.get("model", "")

    def stats(self, viewer: str | None = None) -> EndpointStats:
        average = self.processing_time_ns // self.num_requests if self.num_requests else 0
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group,
            num_requests=self.num_requests,
            num_errors=self.num_errors,
            processing_time=self.processing_time_ns,
            average_processing_time=average,
            last_error=self.last_error,
            data=self.data(viewer) if self.data else None,
        )


class Viewer(Protocol):
    """Who asks (from the request's headers), and which models they may see."""

    def identify(self, headers: Mapping[str, str] | None) -> str: ...

    def may_see(self, viewer: str, model: str) -> bool: ...


class MicroService:
    """Identity and discovery for one worker process."""

    def __init__(
        self,
        client: NatsClient,
        *,
        name: str,
        version: str,
        description: str,
        metadata: dict[str, str],
        viewer: Viewer | None = None,
    ) -> None:
        self.client = client
        self.viewer = viewer
        self.name = name
        self.version = version
        self.description = description
        self.metadata = metadata
        self.id = NUID().next().decode()  # the id generator nats.micro uses
        self.started = datetime.now(UTC)
        self.endpoints: list[EndpointRecord] = []
        self._subscriptions: list[Subscription] = []

    async def start(self) -> None:
        handlers = {
            ServiceVerb.PING: self._ping,
            ServiceVerb.INFO: self._info,
            ServiceVerb.STATS: self._stats,
        }
        for verb, handler in handlers.items():
            for name, service_id in ((None, None), (self.name, None), (self.name, self.id)):
                subject = control_subject(verb, name=name, id=service_id)
                self._subscriptions.append(await self.client.subscribe(subject, cb=handler))
        self.started = datetime.now(UTC)

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions.clear()

    def _visible(self, viewer: str | None) -> list[EndpointRecord]:
        if viewer is None or self.viewer is None:
            return self.endpoints
        check = self.viewer.may_see
        return [e for e in self.endpoints if check(viewer, e.model)]

    def info(self, viewer: str | None = None) -> dict[str, Any]:
        endpoints = [
            EndpointInfo(
                name=e.name, subject=e.subject, queue_group=e.queue_group, metadata=e.metadata
            )
            for e in self._visible(viewer)
        ]
        return ServiceInfo(
            name=self.name,
            id=self.id,
            version=self.version,
            description=self.description,
            endpoints=endpoints,
            metadata=self.metadata,
        ).to_dict()

    def stats(self, viewer: str | None = None) -> dict[str, Any]:
        return ServiceStats(
            name=self.name,
            id=self.id,
            version=self.version,
            started=self.started,
            endpoints=[e.stats(viewer) for e in self._visible(viewer)],
            metadata=self.metadata,
        ).to_dict()

    def ping(self) -> dict[str, Any]:
        return ServicePing(
            id=self.id, name=self.name, version=self.version, metadata=self.metadata
        ).to_dict()

    async def _ping(self, msg: Msg) -> None:
        await self._reply(msg, self.ping())

    def _viewer_of(self, msg: Msg) -> str | None:
        return None if self.viewer is None else self.viewer.identify(msg.headers)

    async def _info(self, msg: Msg) -> None:
        await self._reply(msg, self.info(self._viewer_of(msg)))

    async def _stats(self, msg: Msg) -> None:
        await self._reply(msg, self.stats(self._viewer_of(msg)))

    async def _reply(self, msg: Msg, body: dict[str, Any]) -> None:
        if msg.reply:
            await self.client.publish(msg.reply, orjson.dumps(body))
