"""Liveness: a connection that no longer reads is noticed and reconnected."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from inferbus.errors import Unavailable
from inferbus.pipeline.lifecycle import cancel_and_wait
from inferbus.pipeline.nats_errors import nats_errors

log = logging.getLogger("inferbus")


class Liveness:
    """Notices a connection that no longer reads, and reconnects it (subscriptions included).

    nats-py 2.16 ends its read loop, without reconnecting, on a message whose header status
    line is not UTF-8 — anyone who can publish to a subject we subscribe to can send one —
    and would notice only at its next ping interval, minutes later. So every ``interval``
    seconds the connection sends itself a message on a private inbox, which must come back
    within ``timeout``. (Not nats-py's own PING: when ``rtt``/``flush`` time out they cancel the
    PONG's future, and the late PONG then ends the read loop — the very failure to catch.)
    """

    def __init__(self, nats: NatsClient, *, interval: float = 1.0, timeout: float = 2.0) -> None:
        self.nats = nats
        self.interval = interval
        self.timeout = timeout
        self.reconnects = 0  # forced by this check, for tests and logs
        self._heard = asyncio.Event()
        self._subject = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._subject = self.nats.new_inbox()
        await self.nats.subscribe(self._subject, cb=self._echo)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])

    async def _echo(self, msg: Msg) -> None:
        self._heard.set()

    async def _run(self) -> None:
        while not self.nats.is_closed:
            await asyncio.sleep(self.interval)
            if not self.nats.is_connected:
                continue  # nats-py is reconnecting already
            self._heard.clear()
            try:
                with nats_errors(self._subject, self.timeout):
                    await self.nats.publish(self._subject, b"")
            except Unavailable:
                return  # closed for good: whoever owns the connection handles that
            try:
                await asyncio.wait_for(self._heard.wait(), self.timeout)
            except TimeoutError:
                log.warning("NATS: our own message did not come back within %gs: the "
                            "connection is wedged; reconnecting", self.timeout)  # fmt: skip
                self.reconnects += 1
                await self.nats.force_reconnect()
