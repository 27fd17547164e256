"""The client's transport: one request body out, one reply body back.

``exchange`` sends a body as one message when it fits the server's max_payload and as a
chunked transfer when it does not, fetches a reply that arrives as a transfer offer, and
turns error replies and NATS errors into ``RequestError`` — the client above it never sees a
NATS message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from nats.aio.client import Client as NatsClient

from inferbus.contract import error_from_reply
from inferbus.errors import BadInput
from inferbus.pipeline import transfer
from inferbus.pipeline.connection import ConnectOptions, connect_nats
from inferbus.pipeline.liveness import Liveness
from inferbus.pipeline.nats_errors import nats_errors

MAX_REPLY_BYTES: Final = 256 * 1024 * 1024
MAX_REPLY_BYTES_IN_FLIGHT: Final = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReplyLimits:
    """What replies may cost the client: ``max_bytes`` for one reply (its transfer, and its
    tensors once decoded: a small compressed reply may not inflate past it), and
    ``in_flight_bytes`` for all reply transfers under way at once. Beyond either, 413."""

    max_bytes: int = MAX_REPLY_BYTES
    in_flight_bytes: int = MAX_REPLY_BYTES_IN_FLIGHT

    def __post_init__(self) -> None:
        if not 0 < self.max_bytes <= self.in_flight_bytes:
            raise BadInput("reply limits need 0 < max_bytes <= in_flight_bytes")


class Transport:
    """Request/reply over one NATS connection, kept alive by a ``Liveness`` check."""

    def __init__(self, nats: NatsClient, limits: ReplyLimits | None = None) -> None:
        self.nats = nats
        self.limits = limits or ReplyLimits()
        self._replies = transfer.TransferBudget(self.limits.in_flight_bytes)
        self._liveness = Liveness(nats)

    @classmethod
    async def open(cls, options: ConnectOptions, limits: ReplyLimits | None = None) -> Transport:
        transport = cls(await connect_nats(options), limits)
        await transport._liveness.start()
        return transport

    async def close(self) -> None:
        await self._liveness.stop()
        if not self.nats.is_closed:
            await self.nats.drain()

    async def exchange(
        self, subject: str, body: bytes, timeout: float, reply_within: float = 0.0
    ) -> bytes | bytearray:
        """Send ``body`` to ``subject``; the reply's body, or the error it carries, raised.

        ``timeout`` bounds the wait for the reply to begin; a reply that comes as a transfer
        may take up to ``reply_within`` seconds from now, if that is longer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, reply_within)
        if len(body) > self.nats.max_payload:  # in chunks; the commit's answer is the reply
            reply = await transfer.send(self.nats, subject, body, timeout=timeout)
        else:
            with nats_errors(subject, timeout):
                reply = await self.nats.request(subject, body, timeout=timeout)
        error = error_from_reply(reply.headers, reply.data)
        if error is not None:
            raise error
        if transfer.is_offer(reply):  # the reply itself is too large for one message
            left = max(deadline - loop.time(), 0.001)
            return await transfer.fetch(
                self.nats, reply, self.limits.max_bytes, timeout=left, budget=self._replies
            )
        return reply.data
