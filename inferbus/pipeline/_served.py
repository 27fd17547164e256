"""One model version on a worker: its lifecycle, and the request path that connects its parts.

    load → warm up → subscribe (in rotation) ⇄ out of rotation → drain → close

A message goes admission → scheduler (the batch queue) → executor → replier: the parts that
``_path.RequestPath`` connects. On a shared bus each message first meets the tenancy gate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from inferbus.contract import (
    endpoint_metadata,
    endpoint_name,
    infer_subject,
    queue_group,
    reply_subject_problem,
    requester_account,
)
from inferbus.engines import Engine, create_engine
from inferbus.errors import Unavailable
from inferbus.pipeline._admission import Admission, Work
from inferbus.pipeline._executor import Executor, load_engines, runs_inline
from inferbus.pipeline._health import Health
from inferbus.pipeline._path import RequestPath
from inferbus.pipeline._replier import Replier
from inferbus.pipeline._service import EndpointRecord, MicroService
from inferbus.pipeline._stats import ModelStats
from inferbus.pipeline._threads import run_in_thread
from inferbus.pipeline.batching import BatchQueue, Scheduler
from inferbus.pipeline.connection import confirm_subscriptions
from inferbus.pipeline.fair import FairBatchQueue
from inferbus.pipeline.lifecycle import cancel_and_wait
from inferbus.pipeline.policy import Tenancy, UserUsage
from inferbus.pipeline.transfer import is_offer
from inferbus.repository import ModelConfig

log = logging.getLogger("inferbus.worker")
YIELD_EVERY = 16  # messages handled in a row under a backlog before the loop is yielded
# Below this backlog, yielding only splits replies into more, smaller writes (measured: more
# CPU per request in the worker, the client and nats-server alike).
YIELD_ABOVE = 256
# nats-py drops (and reports) what a subscription holds beyond this many max_queue_sizes; before
# that, messages over one max_queue_size are answered 429 at once.
PENDING_PER_QUEUED = 8


@dataclass(slots=True)
class _Route:
    """One subscribed subject; ``subscription`` is None while out of rotation."""

    record: EndpointRecord
    subscription: Subscription | None = None


async def load_served_model(config: ModelConfig, tenancy: Tenancy | None = None) -> ServedModel:
    """Create, load and warm up ``instances`` engines off the loop; choose where they run."""
    engines = [create_engine(config) for _ in range(config.instances)]
    await load_engines(engines)
    inline = config.execution == "inline"
    if config.execution == "auto" and config.instances == 1:
        inline = await run_in_thread(None, runs_inline, engines[0])
    where = "on the event loop" if inline else f"on {config.instances} thread(s)"
    log.info("%s v%d loaded: %s on %s, runs %s", config.name, config.version,
             engines[0].backend, engines[0].device, where)  # fmt: skip
    return ServedModel(engines, inline=inline, tenancy=tenancy)


class ServedModel:
    """A model version's parts, wired together, and its subscriptions."""

    def __init__(
        self, engines: list[Engine], *, inline: bool = False, tenancy: Tenancy | None = None
    ) -> None:
        self.config = engines[0].config
        self.tenancy = tenancy  # a shared bus: identities, grants, quotas, fair queues
        self.signature = engines[0].signature
        self.engine_info = (engines[0].backend or type(engines[0]).__name__, engines[0].device)
        self.instances = len(engines)
        self.stats = ModelStats()
        self.health = Health(self.config.hang_after_s, self.config.max_failures)
        self.admission = Admission(self.config, self.signature)
        self.usage = UserUsage()
        self.queue: Scheduler[Work] = (
            BatchQueue.for_config(self.config)
            if tenancy is None
            else FairBatchQueue.for_config(self.config)
        )
        self.executor = Executor(engines, inline=inline, stats=self.stats, health=self.health,
                                 usage=None if tenancy is None else self.usage)  # fmt: skip
        self._replier: Replier | None = None
        self._direct = inline and len(engines) == 1 and not self.config.max_queue_delay_ms
        self._routes: list[_Route] = []
        self._unyielded = 0
        self._consumers: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def replier(self) -> Replier:
        if self._replier is None:
            raise RuntimeError("ServedModel.start() was not called")
        return self._replier

    @property
    def in_rotation(self) -> bool:
        return bool(self._routes) and all(r.subscription is not None for r in self._routes)

    def metadata(self) -> dict[str, str]:
        engine, device = self.engine_info
        return endpoint_metadata(self.config.name, self.config.version, self.signature,
                                 engine=engine, device=device, instances=self.instances,
                                 max_batch_size=self.config.max_batch_size)  # fmt: skip

    def stats_data(self, viewer: str | None = None) -> dict[str, Any]:
        """The endpoint's STATS data; on a shared bus with each user's usage (a user who asks
        sees only their own)."""
        data = self.stats.snapshot(pending=len(self.queue))
        data["health"] = "ready" if self.health.healthy else f"unhealthy: {self.health.reason}"
        if self.tenancy is not None:
            users = self.usage.snapshot()
            if viewer:
                users = {name: row for name, row in users.items() if name == viewer}
            data["users"] = users
        return data

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, nats: NatsClient, service: MicroService, *, latest: bool) -> None:
        """Start the consumers and subscribe the versioned subject (and, for the latest
        version, the unversioned one). The caller flushes: only then are subscriptions live."""
        self._replier = Replier(self.config, self.stats, nats)
        self.path = RequestPath(
            admission=self.admission,
            queue=self.queue,
            executor=self.executor,
            replier=self._replier,
            stats=self.stats,
            usage=self.usage,
            tenancy=self.tenancy,
            direct=self._direct,
        )
        if self.tenancy is not None:
            self._replier.answered = self.path.answered
        self._consumers = [
            asyncio.create_task(self.path.consume(instance))
            for instance in range(len(self.executor.engines))
        ]
        for version in (self.config.version, None) if latest else (self.config.version,):
            await self.serve(service, version)

    async def serve(self, service: MicroService, version: int | None) -> None:
        """Subscribe one subject: this version's, or with None the unversioned one (which the
        highest version a worker holds serves). The caller flushes."""
        name = self.config.name
        record = EndpointRecord(
            name=endpoint_name(name, version),
            subject=infer_subject(name, version),
            queue_group=queue_group(name, version),
            metadata=self.metadata(),
            data=self.stats_data,
        )
        route = _Route(record)
        await self._listen(route)
        self._routes.append(route)
        service.endpoints.append(record)

    async def unserve(self, service: MicroService, version: int | None = None) -> None:
        """Drain one subject (by default the unversioned one: a newer version took it) and
        take its endpoint out of discovery; what was delivered is still answered."""
        name = endpoint_name(self.config.name, version)
        for route in [r for r in self._routes if r.record.name == name]:
            self._routes.remove(route)
            service.endpoints.remove(route.record)
            if route.subscription is not None:
                await route.subscription.drain()  # type: ignore[no-untyped-call]

    @property
    def serves_unversioned(self) -> bool:
        return any(r.record.name == self.config.name for r in self._routes)

    @property
    def records(self) -> list[EndpointRecord]:
        return [route.record for route in self._routes]

    @property
    def idle(self) -> bool:
        """Nothing queued, computing or being answered right now."""
        return not len(self.queue) and (self._replier is None or self._replier.idle)

    async def _listen(self, route: _Route) -> None:
        record = route.record

        async def on_message(msg: Msg) -> None:
            # nats-py awaits one subscription's callbacks in turn: this only admits the request.
            if not msg.reply:  # a publish, not a request, has nobody to answer
                return
            if reply_subject_problem(msg.reply):  # answering could harm the bus or us
                self.stats.dropped()
                return
            user = requester_account(msg.headers) or ""  # on a shared bus, the server's word
            roster = self.tenancy is not None  # then: may they ask, now?
            if roster and await self.path.refused(user, self.config.name, msg.reply, record):
                return
            if is_offer(msg):
                await self.path.accept_transfer(msg, record)
                return
            backlog = route.subscription.pending_msgs if route.subscription is not None else 0
            if backlog >= self.config.max_queue_size:  # cannot keep up: 429 now, undecoded
                await self.replier.shed(msg.reply, record)
            else:
                await self.path.receive(msg.data, msg.reply, record, backlog, user)
            if backlog >= YIELD_ABOVE:  # nats-py hands queued messages over without
                self._unyielded += 1  # suspending: let its read loop run now and then when
                if self._unyielded % YIELD_EVERY == 0:  # far behind, or nats-server cuts us off
                    await asyncio.sleep(0)

        route.subscription = await self.replier.nats.subscribe(
            record.subject,
            queue=record.queue_group,
            cb=on_message,
            pending_msgs_limit=PENDING_PER_QUEUED * self.config.max_queue_size,
        )

    async def take_out(self, reason: str) -> None:
        """Out of rotation: stop taking requests; answer the queued ones 503 so callers retry
        elsewhere instead of waiting here."""
        log.warning("%s: out of rotation: %s", self.config.name, reason)
        self.health.take_out(reason, time.monotonic())
        await self._stop_listening()
        error = Unavailable(f"this worker's engine is unfit: {reason}")
        for item in self.queue.take_all():
            await self.replier.reply(item.payload, error)

    async def put_back(self) -> None:
        if self._closed:  # unloaded while its health was being checked: stays out
            return
        self.health.put_back()
        for route in self._routes:
            if route.subscription is None:
                await self._listen(route)
        await confirm_subscriptions(self.replier.nats)
        log.info("%s: back in rotation", self.config.name)

    async def check_health(self, now: float) -> None:
        """Take an unfit engine out of rotation; bring it back once it is fit again."""
        health = self.health
        if health.healthy:
            reason = health.verdict(now)
            if reason and health.busy_since is None and await self.executor.probe():
                # Failures the engine does not repeat on its warm-up inputs were the inputs'
                # fault: a client must not be able to take a model out of rotation.
                log.info("%s: %s, but the engine passes its probe: inputs blamed",
                         self.config.name, reason)  # fmt: skip
                health.blame_inputs()
                return
            if reason:
                await self.take_out(reason)
        elif health.busy_since is None and (
            health.failures_in_a_row < health.max_failures  # a hang that ended
            or (health.may_probe(now) and await self.executor.probe())
        ):
            await self.put_back()

    async def _stop_listening(self) -> None:
        for route in self._routes:
            subscription, route.subscription = route.subscription, None
            if subscription is not None:
                # Messages already delivered are still handed to on_message; nats-py leaves
                # drain untyped.
                await subscription.drain()  # type: ignore[no-untyped-call]

    async def drain(self) -> None:
        """Take no more requests; return once every one received has been answered."""
        await self._stop_listening()
        if self._replier is not None:
            await self._replier.wait_idle()

    async def close(self) -> None:
        """Stop the consumers and release the engines (after ``drain``)."""
        self._closed = True
        await cancel_and_wait(self._consumers)
        left = self.queue.take_all()  # empty after a drain; not empty only if start failed
        if left:
            log.warning("%s: %d queued requests dropped at close", self.config.name, len(left))
        self.executor.close()
