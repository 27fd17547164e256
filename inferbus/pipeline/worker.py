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
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from nats.aio.client import Client as NatsClient

from inferbus.contract import SERVICE_NAME, endpoint_name
from inferbus.errors import ConfigError, ConnectionFailed
from inferbus.pipeline._metrics import MetricsServer
from inferbus.pipeline._served import ServedModel, load_served_model
from inferbus.pipeline._service import MicroService
from inferbus.pipeline.connection import (
    ConnectOptions,
    confirm_subscriptions,
    connect_nats,
)
from inferbus.pipeline.lifecycle import AsyncResource, cancel_and_wait
from inferbus.pipeline.liveness import Liveness
from inferbus.pipeline.policy import Tenancy
from inferbus.repository import ModelConfig

if TYPE_CHECKING:
    from inferbus.store.reconcile import Reconciler, StoreSettings
from inferbus.version import __version__

log = logging.getLogger("inferbus.worker")
WATCH_INTERVAL_S = 0.2


class Worker(AsyncResource):
    """Serves models over NATS: ``async with Worker(configs) as worker: await worker.wait()``."""

    def __init__(
        self,
        configs: Sequence[ModelConfig],
        options: ConnectOptions | None = None,
        *,
        metrics_port: int | None = None,
        roster: Path | None = None,
        store: StoreSettings | None = None,
    ) -> None:
        """``roster``: serve a shared bus (docs/SECURITY.md): identify users by their NATS
        account, enforce the roster's grants and quotas, queue users fairly. The file is
        re-read when it changes. ``store``: also serve what is deployed in the model store
        (docs/STORE.md), as far as these settings leave room."""
        self.configs = list(configs)
        self.tenancy = Tenancy(roster) if roster is not None else None
        self.options = options or ConnectOptions(name="inferbus-worker")
        self.store = store
        self._reconciler: Reconciler | None = None
        self.metrics_port = metrics_port
        self.metrics: MetricsServer | None = None
        self.models: list[ServedModel] = []
        self._client: NatsClient | None = None
        self._service: MicroService | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._liveness: Liveness | None = None
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._lost_connection = False

    @property
    def nats(self) -> NatsClient:
        if self._client is None:
            raise RuntimeError("worker not started")
        return self._client

    @property
    def service(self) -> MicroService:
        if self._service is None:
            raise RuntimeError("worker not started")
        return self._service

    async def start(self) -> None:
        self._check_endpoint_names()
        for config in self.configs:
            self.models.append(await load_served_model(config, self.tenancy))
        client = self._client = await connect_nats(self.options, self._connection_closed)
        self._liveness = Liveness(client)
        await self._liveness.start()
        self._service = MicroService(
            client,
            name=SERVICE_NAME,
            version=__version__,
            description="inferbus model end",
            metadata=self._service_metadata(),
            viewer=self.tenancy,
        )
        await self._service.start()
        for model in self.models:
            await model.start(client, self._service, latest=self._is_latest(model.config))
        await confirm_subscriptions(client)  # only then are we routed requests
        self._watchdog = asyncio.create_task(self._watch())
        if self.store is not None:
            from inferbus.store.reconcile import Reconciler  # JetStream: only when asked for

            self._reconciler = Reconciler(self, self.store)
            await self._reconciler.start()
        if self.metrics_port is not None:
            self.metrics = MetricsServer(lambda: self.models, self.metrics_port)
            log.info("Prometheus metrics on port %d", self.metrics.port)
        names = ", ".join(f"{c.name} v{c.version}" for c in self.configs)
        url = client.connected_url.geturl() if client.connected_url else "?"
        log.info("worker %s serving %s on %s", self._service.id, names, url)

    async def add_model(self, config: ModelConfig) -> ServedModel:
        """Load and serve a model version while running (the store does). A version above
        those held takes over the unversioned subject once it is subscribed; nothing sent
        to the one it replaces is lost (that one drains)."""
        if any(c.name == config.name and c.version == config.version for c in self.configs):
            raise ConfigError(f"{config.name} v{config.version} is served here already")
        self._check_endpoint_names([*self.configs, config])
        served = await load_served_model(config, self.tenancy)
        older = [m for m in self.models if m.config.name == config.name]
        latest = all(m.config.version < config.version for m in older)
        try:
            await served.start(self.nats, self.service, latest=latest)
            await confirm_subscriptions(self.nats)
        except BaseException:
            await served.drain()
            await served.close()
            raise
        self.models.append(served)
        self.configs.append(config)
        for model in older if latest else []:
            await model.unserve(self.service)
        return served

    async def remove_model(self, name: str, version: int) -> None:
        """Stop serving a model version: the next version down takes over the unversioned
        subject first, then this one drains (everything delivered is answered) and unloads."""
        found = [m for m in self.models if (m.config.name, m.config.version) == (name, version)]
        if not found:
            raise ConfigError(f"{name} v{version} is not served here")
        served = found[0]
        self.models.remove(served)
        self.configs.remove(served.config)
        if served.serves_unversioned:
            rest = [m for m in self.models if m.config.name == served.config.name]
            if rest:
                await max(rest, key=lambda m: m.config.version).serve(self.service, None)
                await confirm_subscriptions(self.nats)
        await served.drain()
        for record in served.records:
            self.service.endpoints.remove(record)
        await served.close()

    def _service_metadata(self) -> dict[str, str]:
        """Who this worker is; with a store, the room it declares (what it holds are its
        endpoints)."""
        metadata = {"host": socket.gethostname(), "pid": str(os.getpid())}
        if self.store is not None:
            room = {"max_models": self.store.max_models, "memory_mb": self.store.memory_mb,
                    "device": self.store.device}  # fmt: skip
            metadata["store"] = orjson.dumps(room).decode()
        return metadata

    def _check_endpoint_names(self, configs: Sequence[ModelConfig] | None = None) -> None:
        # Model "add_v2" and version 2 of "add" would both be an endpoint named "add_v2".
        configs = self.configs if configs is None else configs
        names = {c.name for c in configs}
        versioned = sorted(endpoint_name(c.name, c.version) for c in configs)
        clashing = [name for name in versioned if name in names]
        if clashing:
            raise ConfigError(f"model names {clashing} clash with versioned endpoint names")

    def _is_latest(self, config: ModelConfig) -> bool:
        return config.version == max(c.version for c in self.configs if c.name == config.name)

    @property
    def ready(self) -> bool:
        """Every model is in rotation (liveness is answering $SRV.PING at all)."""
        return bool(self.models) and all(model.in_rotation for model in self.models)

    async def _watch(self) -> None:
        """Take unfit engines out of rotation, and bring them back once fit again."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for model in list(self.models):  # the store may load or unload meanwhile
                if model in self.models:
                    await model.check_health(now)
            if self.tenancy is not None:
                self.tenancy.reload_if_changed()

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
        if self._reconciler is not None:
            await self._reconciler.stop()
            self._reconciler = None
        if self._liveness is not None:
            await self._liveness.stop()
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
            await cancel_and_wait([self._watchdog])
        async with asyncio.TaskGroup() as group:  # every model drains at once
            for model in self.models:
                group.create_task(model.drain())
        if self._service is not None:
            await self._service.stop()
        await client.flush()
        await client.close()
