"""The model end: serves a model repository as a NATS micro service.

Start-up order matters: engines load and warm up, then the worker subscribes and flushes, so
it is never routed a request it cannot serve. Stopping drains: subscriptions stop taking new
requests, the ones already delivered are answered, then the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from inferbus import __version__
from inferbus.errors import ConfigError, ConnectionFailed
from inferbus.pipeline._connection import ConnectOptions, connect_nats
from inferbus.pipeline._lifecycle import AsyncResource
from inferbus.pipeline._metrics import MetricsServer
from inferbus.pipeline._service import EndpointRecord, MicroService
from inferbus.pipeline._serving import ServedModel, load_served_model
from inferbus.pipeline._transfer import is_offer
from inferbus.pipeline.subjects import SERVICE_NAME, infer_subject, queue_group
from inferbus.repository import ModelConfig

log = logging.getLogger("inferbus.worker")
WATCH_INTERVAL_S = 0.2


@dataclass(slots=True)
class _Route:
    """One subscribed subject of a model version; ``subscription`` is None out of rotation."""

    model: ServedModel
    record: EndpointRecord
    subscription: Subscription | None = None


class Worker(AsyncResource):
    """Serves models over NATS: ``async with Worker(configs) as worker: await worker.wait()``."""

    def __init__(
        self,
        configs: Sequence[ModelConfig],
        options: ConnectOptions | None = None,
        *,
        metrics_port: int | None = None,
    ) -> None:
        self.configs = list(configs)
        self.options = options or ConnectOptions(name="inferbus-worker")
        self.metrics_port = metrics_port
        self.metrics: MetricsServer | None = None
        self.models: list[ServedModel] = []
        self._client: NatsClient | None = None
        self._service: MicroService | None = None
        self._routes: list[_Route] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._lost_connection = False

    @property
    def service(self) -> MicroService:
        if self._service is None:
            raise RuntimeError("worker not started")
        return self._service

    async def start(self) -> None:
        self._check_endpoint_names()
        for config in self.configs:
            self.models.append(await load_served_model(config))
        client = self._client = await connect_nats(self.options, self._connection_closed)
        self._service = MicroService(
            client,
            name=SERVICE_NAME,
            version=__version__,
            description="inferbus model end",
            metadata={"host": socket.gethostname(), "pid": str(os.getpid())},
        )
        await self._service.start()
        for model in self.models:
            model.start(client)
            await self._subscribe(model, model.config.version)
            if self._is_latest(model.config):
                await self._subscribe(model, None)
        # Subscriptions are only in force once the server has seen them.
        await client.flush()
        self._watchdog = asyncio.create_task(self._watch())
        if self.metrics_port is not None:
            self.metrics = MetricsServer(lambda: self.models, self.metrics_port)
            log.info("Prometheus metrics on port %d", self.metrics.port)
        names = ", ".join(f"{c.name} v{c.version}" for c in self.configs)
        url = client.connected_url.geturl() if client.connected_url else "?"
        log.info("worker %s serving %s on %s", self._service.id, names, url)

    def _check_endpoint_names(self) -> None:
        # Model "add_v2" and version 2 of "add" would both be an endpoint named "add_v2".
        names = {c.name for c in self.configs}
        clashes = sorted(f"{c.name}_v{c.version}" for c in self.configs)
        clashing = [name for name in clashes if name in names]
        if clashing:
            raise ConfigError(f"model names {clashing} clash with versioned endpoint names")

    def _is_latest(self, config: ModelConfig) -> bool:
        return config.version == max(c.version for c in self.configs if c.name == config.name)

    async def _subscribe(self, model: ServedModel, version: int | None) -> None:
        assert self._service is not None
        name = model.config.name
        record = EndpointRecord(
            name=name if version is None else f"{name}_v{version}",
            subject=infer_subject(name, version),
            queue_group=queue_group(name, version),
            metadata=model.metadata(),
            data=model.stats_data,
        )
        route = _Route(model, record)
        await self._listen(route)
        self._routes.append(route)
        self._service.endpoints.append(record)

    async def _listen(self, route: _Route) -> None:
        assert self._client is not None
        model, record = route.model, route.record

        async def enqueue(msg: Msg) -> None:
            # nats-py awaits one subscription's callbacks in turn: this only admits the request.
            if not msg.reply:  # a publish, not a request, has nobody to answer
                return
            if is_offer(msg):
                await model.accept_transfer(msg, record)
                return
            backlog = route.subscription.pending_msgs if route.subscription is not None else 0
            await model.admit(msg.data, msg.reply, record, backlog)

        route.subscription = await self._client.subscribe(
            record.subject, queue=record.queue_group, cb=enqueue
        )

    @property
    def ready(self) -> bool:
        """Every model is in rotation (liveness is answering $SRV.PING at all)."""
        return bool(self._routes) and all(r.subscription is not None for r in self._routes)

    async def _watch(self) -> None:
        """Take unfit engines out of rotation, and bring them back once fit again."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for model in self.models:
                health = model.health
                if health.healthy:
                    reason = health.verdict(now)
                    if reason:
                        await self._take_out(model, reason, now)
                elif health.busy_since is None and (
                    health.failures_in_a_row < health.max_failures  # a hang that ended
                    or (health.may_probe(now) and await model.probe())
                ):
                    await self._put_back(model)

    async def _take_out(self, model: ServedModel, reason: str, now: float) -> None:
        log.warning("%s: out of rotation: %s", model.config.name, reason)
        model.health.reason, model.health.unhealthy_since = reason, now
        for route in self._routes:
            if route.model is model and route.subscription is not None:
                subscription, route.subscription = route.subscription, None
                await subscription.drain()  # type: ignore[no-untyped-call]
        await model.reject_queued(reason)

    async def _put_back(self, model: ServedModel) -> None:
        assert self._client is not None
        model.health.reason, model.health.unhealthy_since = "", None
        model.health.failures_in_a_row = 0
        for route in self._routes:
            if route.model is model and route.subscription is None:
                await self._listen(route)
        await self._client.flush()
        log.info("%s: back in rotation", model.config.name)

    async def _connection_closed(self) -> None:
        if not self._stopping:
            log.error("NATS connection closed for good; stopping so a supervisor can restart us")
            self._lost_connection = True
            self._stop_requested.set()

    def request_stop(self) -> None:
        """Ask ``wait()`` to return; safe from a signal handler."""
        self._stop_requested.set()

    async def wait(self, *, handle_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or ``request_stop``), then drain and stop."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop_requested.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        log.info("stop requested: draining")
        await self.stop()
        if self._lost_connection:
            raise ConnectionFailed("the NATS connection was closed for good")

    async def stop(self) -> None:
        """Stop taking requests, answer those already received, close."""
        self._stopping = True
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            try:
                await self._drain(client)
            except Exception as exc:  # a dead connection must not keep the engines open
                log.warning("drain cut short: %s", exc)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        models, self.models = self.models, []
        for model in models:
            await model.close()
        if client is not None:
            log.info("worker stopped")

    async def _drain(self, client: NatsClient) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        for route in self._routes:
            if route.subscription is not None:
                # Delivered messages are still handed to enqueue; nats-py leaves it untyped.
                await route.subscription.drain()  # type: ignore[no-untyped-call]
                route.subscription = None
        for model in self.models:
            await model.wait_idle()
        if self._service is not None:
            await self._service.stop()
        await client.flush()
        await client.close()
