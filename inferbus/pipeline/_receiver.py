"""A worker's side of a request sent in chunks (docs/PROTOCOL.md section 13.1): the offer is
answered with a transfer subject, the chunks are stored as they come and acknowledged, and the
commit hands the body over with the subject its reply goes to. Every message sent is the one
reply to a message received, so it works across accounts as on an open bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from inferbus.contract import reply_subject_problem
from inferbus.errors import BadInput, DeadlineExceeded, Overloaded, PayloadTooLarge, RequestError
from inferbus.pipeline._offer import (
    CHUNK_HEADER,
    COMMIT,
    IDLE_S,
    Offer,
    answer_error,
    foreign,
    framed,
    new_transfer_subject,
    refuse_foreign,
)

# A transfer must average this many bytes a second after its first RATE_GRACE_S (4 MiB/s is a
# 32 Mbit/s link; this machine moves 110-200 MB/s): a drip cannot hold a receiver's memory.
MIN_RATE: Final = 4 * 1024 * 1024
RATE_GRACE_S: Final = 2.0
CHECK_S: Final = 0.5  # how often a waiting receiver checks the rate


class TransferBudget:
    """Bytes a process may have in transfers at once, and at most ``share`` of them for one
    sender (an account, or a connection on an open bus); offers beyond either are refused."""

    def __init__(self, limit: int, *, share: float = 1.0) -> None:
        self.limit = limit
        self.per_sender = int(limit * share)
        self.in_use = 0
        self._by_sender: dict[str, int] = {}

    def reserve(self, size: int, sender: str = "") -> bool:
        held = self._by_sender.get(sender, 0)
        if self.in_use + size > self.limit or held + size > self.per_sender:
            return False
        self.in_use += size
        self._by_sender[sender] = held + size
        return True

    def release(self, size: int, sender: str = "") -> None:
        self.in_use -= size
        held = self._by_sender.pop(sender, 0) - size
        if held > 0:
            self._by_sender[sender] = held


def sender_of(reply: str, owner: str | None = None) -> str:
    """Who made an offer: its account when the server said (``owner``); on an open bus, its
    reply inbox's connection prefix (nats-py and the other clients answer requests on
    ``_INBOX.<connection>.<token>``)."""
    return owner if owner is not None else ".".join(reply.split(".", 2)[:2])


class Receiver:
    """One incoming request transfer: a buffer filled by chunk requests on a transfer subject,
    handed over at the commit. ``owner``: the account it belongs to, when known (13.3)."""

    active: int = 0  # transfers in progress in this process, for tests and stats

    def __init__(
        self,
        client: NatsClient,
        offer: Offer,
        budget: TransferBudget | None = None,
        sender: str = "",
        owner: str | None = None,
    ) -> None:
        self.client = client
        self.offer = offer
        self.sender = sender
        self.owner = owner
        self.subject = new_transfer_subject()
        self.reply = ""  # the commit's reply subject: where the request's answer goes
        self.received = 0
        self.started = time.monotonic()
        # Allocated at the first chunk, not at the offer: an offer alone commits no memory.
        self.buffer = bytearray()
        self.missing = set(range(offer.chunks))
        self.done: asyncio.Future[bytearray] = asyncio.get_running_loop().create_future()
        self.last_activity = time.monotonic()
        self._budget = budget
        self._subscription: Subscription | None = None
        self._closed = False

    @classmethod
    async def accept(
        cls,
        client: NatsClient,
        msg: Msg,
        limit: int,
        *,
        budget: TransferBudget | None = None,
        owner: str | None = None,
    ) -> Receiver:
        """Answer an offer: refuse it (413, 429, 400) or open a transfer subject for it.

        An offer that does not fit the ``budget`` now gets 429 (try again later)."""
        try:
            offer = Offer.parse(msg.data)
            if offer.size > limit:
                raise PayloadTooLarge(f"transfer of {offer.size} bytes exceeds the limit {limit}")
            sender = sender_of(msg.reply, owner)
            if budget is not None and not budget.reserve(offer.size, sender):
                raise Overloaded(
                    f"too many bytes already in transfer here ({budget.limit} in all, "
                    f"{budget.per_sender} per sender)"
                )
        except RequestError as exc:
            await answer_error(client, msg.reply, exc)
            raise
        receiver = cls(client, offer, budget, sender, owner)
        Receiver.active += 1
        try:
            receiver._subscription = await client.subscribe(receiver.subject, cb=receiver._on_chunk)
            await client.publish(msg.reply, framed({"transfer": {"subject": receiver.subject}}))
        except BaseException:
            await receiver.close()
            raise
        return receiver

    async def _on_chunk(self, msg: Msg) -> None:
        if self.done.done():  # committed or failed: the buffer is no longer ours to write
            return
        if foreign(self.owner, msg):  # another account: refused, nothing changes
            await refuse_foreign(self.client, msg)
            return
        header = (msg.headers or {}).get(CHUNK_HEADER, "")
        if header == COMMIT:
            await self._commit(msg)
            return
        if reply_subject_problem(msg.reply):  # acks go only where a sender may be listening
            return
        try:
            index = self._store(header, msg.data)
        except RequestError as exc:
            await answer_error(self.client, msg.reply, exc)
            self._finish(exc)
            return
        if index in self.missing:
            self.missing.discard(index)
            self.received += len(msg.data)
        self.last_activity = time.monotonic()
        await self.client.publish(msg.reply, b"")

    async def _commit(self, msg: Msg) -> None:
        if self.missing:
            error = BadInput(
                f"commit with {len(self.missing)} of {self.offer.chunks} chunks missing"
            )
            await answer_error(self.client, msg.reply, error)
            self._finish(error)
            return
        self.reply = msg.reply  # checked by whoever answers it
        self._finish(None)

    def _store(self, header: str, data: bytes) -> int:
        index_text, _, crc_text = header.partition(" ")
        if not all(text.isascii() and text.isdigit() for text in (index_text, crc_text)):
            raise BadInput(f"chunk lacks a valid {CHUNK_HEADER} header")
        index = int(index_text)
        if index >= self.offer.chunks:
            raise BadInput(f"chunk {index} is past the last one ({self.offer.chunks - 1})")
        span = self.offer.span(index)
        expected = span.stop - span.start
        if len(data) != expected:
            raise BadInput(f"chunk {index} has {len(data)} bytes; expected {expected}")
        if zlib.crc32(data) != int(crc_text):
            raise BadInput(f"chunk {index} fails its checksum")
        if not self.buffer:
            self.buffer = bytearray(self.offer.size)  # the one allocation, size checked
        self.buffer[span] = data
        return index

    def _finish(self, error: BaseException | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(self.buffer)
        else:
            self.done.set_exception(error)

    async def wait(self) -> bytearray:
        """The whole body once committed (its answer goes to ``reply``), or DeadlineExceeded
        when the sender went quiet, ran out of time or fell below ``MIN_RATE`` (a sender that
        drips chunks holds memory others need); always cleans up."""
        deadline = self.started + self.offer.timeout_s
        try:
            while True:
                now = time.monotonic()
                left = min(deadline - now, IDLE_S - (now - self.last_activity))
                if left <= 0 or self._too_slow(now):
                    raise DeadlineExceeded(
                        f"transfer abandoned: {len(self.missing)} of {self.offer.chunks} "
                        f"chunks missing after {now - self.started:.1f}s (sender quiet, too "
                        f"slow, out of time or never committed)"
                    )
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(self.done), min(left, CHECK_S))
        finally:
            await self.close()

    def _too_slow(self, now: float) -> bool:
        due = (now - self.started - RATE_GRACE_S) * MIN_RATE
        return self.received < min(due, self.offer.size)

    async def close(self) -> None:
        """Unsubscribe and free everything (once)."""
        if self._closed:
            return
        self._closed = True
        if self._budget is not None:
            self._budget.release(self.offer.size, self.sender)
        if not self.done.done():
            self.done.cancel()
        self.buffer = bytearray()
        subscription, self._subscription = self._subscription, None
        try:
            if subscription is not None and not self.client.is_closed:
                await subscription.unsubscribe()
        finally:
            Receiver.active -= 1  # last: whoever sees 0 sees everything freed
