"""Bodies larger than the server's max_payload, sent in chunks to the one peer that took them.

The sender offers the body (a small message carrying the ``Inferbus-Transfer: offer`` header
and a JSON description) on the normal subject; the receiver checks the size against its
limit, allocates once, subscribes a private subject and answers with it; the sender then
requests each chunk there (``Inferbus-Chunk: <index> <crc32>``), a window of them in flight,
and every chunk is acknowledged. A receiver whose transfer is not complete within the offer's
time limit abandons it and frees it. The same code carries requests (client → worker) and replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from typing import Final

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from inferbus.contract import error_from_reply, error_reply, reply_subject_problem
from inferbus.errors import (
    BadInput,
    DeadlineExceeded,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    Unavailable,
)
from inferbus.pipeline._offer import CHUNK_HEADER as CHUNK_HEADER
from inferbus.pipeline._offer import MAX_TRANSFER_S as MAX_TRANSFER_S
from inferbus.pipeline._offer import OFFER as OFFER
from inferbus.pipeline._offer import TRANSFER_HEADER as TRANSFER_HEADER
from inferbus.pipeline._offer import Offer as Offer
from inferbus.pipeline._offer import chunk_size
from inferbus.pipeline._offer import is_offer as is_offer
from inferbus.pipeline._offer import transfer_json as transfer_json
from inferbus.pipeline.nats_errors import nats_errors

WINDOW: Final = 8  # chunks in flight: measured faster than one message, without flooding
IDLE_S: Final = 10.0  # a receiver that hears no chunk for this long gives up
CHUNK_ACK_S: Final = 5.0  # a 4 MiB chunk takes well under 0.1 s here
# A transfer must average this many bytes a second after its first RATE_GRACE_S (4 MiB/s is a
# 32 Mbit/s link; this machine moves 110-200 MB/s): a drip cannot hold a receiver's memory.
MIN_RATE: Final = 4 * 1024 * 1024
RATE_GRACE_S: Final = 2.0
CHECK_S: Final = 0.5  # how often a waiting receiver checks the rate


def _raise_if_error(msg: Msg, context: str) -> None:
    error = error_from_reply(msg.headers, msg.data)
    if error is not None:
        raise type(error)(f"{context}: {error.message}")


async def send(
    client: NatsClient, subject: str, body: bytes, *, timeout: float, reply: str = ""
) -> None:
    """Offer ``body`` on ``subject`` and stream it to whoever accepts; raise on any refusal.

    Nobody listening on ``subject`` is ``ModelNotFound``; a receiver that goes away half-way
    is ``Unavailable``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    offer = Offer(len(body), chunk_size(client.max_payload), timeout, reply)
    with nats_errors(subject, timeout):
        answer = await client.request(
            subject, offer.body(), timeout=timeout, headers={TRANSFER_HEADER: OFFER}
        )
    _raise_if_error(answer, "transfer refused")
    target = transfer_json(answer.data).get("subject")
    if not isinstance(target, str) or not target:
        raise BadInput("transfer answer lacks its subject")
    await _stream(client, target, memoryview(body), offer, deadline)


async def _stream(
    client: NatsClient, target: str, body: memoryview, offer: Offer, deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(WINDOW)

    async def one(index: int) -> None:
        async with gate:
            part = body[index * offer.chunk_size : (index + 1) * offer.chunk_size]
            headers = {CHUNK_HEADER: f"{index} {zlib.crc32(part)}"}
            # A receiver that died leaves chunks in flight unanswered: each gets a time limit.
            left = min(max(deadline - loop.time(), 0.001), CHUNK_ACK_S)
            try:
                with nats_errors(target, left, nobody=Unavailable):
                    ack = await client.request(target, part, timeout=left, headers=headers)  # type: ignore[arg-type]
            except DeadlineExceeded:
                raise Unavailable(
                    f"chunk {index} was not acknowledged within {left:g}s: the receiver went away"
                ) from None
            _raise_if_error(ack, f"chunk {index}")

    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels the rest at once
            for index in range(offer.chunks):
                group.create_task(one(index))
    except BaseExceptionGroup as group_error:
        raise _first_error(group_error) from None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The failure that stopped the transfer (the rest were cancelled because of it)."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


class TransferBudget:
    """Bytes a process may have in incoming transfers at once, and at most ``share`` of them
    for one sender (the connection its offers come from); offers beyond either get 429."""

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


def sender_of(reply: str) -> str:
    """Who made an offer, as far as an open bus tells: its reply inbox's connection prefix
    (nats-py and the other clients answer requests on ``_INBOX.<connection>.<token>``)."""
    return ".".join(reply.split(".", 2)[:2])


class Receiver:
    """One incoming transfer: a buffer filled by chunk requests on a private subject."""

    active: int = 0  # transfers in progress in this process, for tests and stats

    def __init__(
        self,
        client: NatsClient,
        offer: Offer,
        budget: TransferBudget | None = None,
        sender: str = "",
    ) -> None:
        self.client = client
        self.offer = offer
        self.sender = sender
        self.received = 0
        self.started = time.monotonic()
        # Allocated at the first chunk, not at the offer: an offer alone commits no memory.
        self.buffer = bytearray()
        self.missing = set(range(offer.chunks))
        self.done: asyncio.Future[bytearray] = asyncio.get_running_loop().create_future()
        self.last_activity = time.monotonic()
        self._budget = budget
        self._subscription: Subscription | None = None

    @classmethod
    async def accept(
        cls,
        client: NatsClient,
        msg: Msg,
        limit: int,
        *,
        needs_reply: bool = False,
        budget: TransferBudget | None = None,
        too_much: type[RequestError] = Overloaded,
    ) -> Receiver:
        """Answer an offer: refuse it (413, 400) or open a private subject for its chunks.

        ``needs_reply``: a request must say where its response goes. An offer that does not
        fit the ``budget`` now is refused with ``too_much`` (a worker: 429, try again later).
        """
        try:
            offer = Offer.parse(msg.data)
            if offer.size > limit:
                raise PayloadTooLarge(f"transfer of {offer.size} bytes exceeds the limit {limit}")
            if needs_reply and not offer.reply:
                raise BadInput("a request sent in chunks must name its reply subject")
            sender = sender_of(msg.reply)
            if budget is not None and not budget.reserve(offer.size, sender):
                raise too_much(
                    f"too many bytes already in transfer here ({budget.limit} in all, "
                    f"{budget.per_sender} per sender)"
                )
        except RequestError as exc:
            await _answer_error(client, msg.reply, exc)
            raise
        receiver = cls(client, offer, budget, sender)
        subject = client.new_inbox()
        receiver._subscription = await client.subscribe(subject, cb=receiver._on_chunk)
        Receiver.active += 1
        answer = orjson.dumps({"transfer": {"subject": subject}})
        await client.publish(msg.reply, len(answer).to_bytes(4, "little") + answer)
        return receiver

    async def _on_chunk(self, msg: Msg) -> None:
        if reply_subject_problem(msg.reply):  # acks go only where a sender may be listening
            return
        try:
            index = self._store(msg)
        except RequestError as exc:
            await _answer_error(self.client, msg.reply, exc)
            self._finish(exc)
            return
        if index in self.missing:
            self.missing.discard(index)
            self.received += len(msg.data)
        self.last_activity = time.monotonic()
        await self.client.publish(msg.reply, b"")
        if not self.missing:
            self._finish(None)

    def _store(self, msg: Msg) -> int:
        index_text, _, crc_text = (msg.headers or {}).get(CHUNK_HEADER, "").partition(" ")
        if not all(text.isascii() and text.isdigit() for text in (index_text, crc_text)):
            raise BadInput(f"chunk lacks a valid {CHUNK_HEADER} header")
        index = int(index_text)
        if index >= self.offer.chunks:
            raise BadInput(f"chunk {index} is past the last one ({self.offer.chunks - 1})")
        start = index * self.offer.chunk_size
        expected = min(self.offer.chunk_size, self.offer.size - start)
        if len(msg.data) != expected:
            raise BadInput(f"chunk {index} has {len(msg.data)} bytes; expected {expected}")
        if zlib.crc32(msg.data) != int(crc_text):
            raise BadInput(f"chunk {index} fails its checksum")
        if not self.buffer:
            self.buffer = bytearray(self.offer.size)  # the one allocation, size checked
        self.buffer[start : start + expected] = msg.data
        return index

    def _finish(self, error: BaseException | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(self.buffer)
        else:
            self.done.set_exception(error)

    async def wait(self) -> bytearray:
        """The whole body, or DeadlineExceeded when the sender went quiet, ran out of time or
        fell below ``MIN_RATE`` (a sender that drips chunks holds memory others need);
        always cleans up."""
        deadline = time.monotonic() + self.offer.timeout_s
        try:
            while True:
                now = time.monotonic()
                left = min(deadline - now, IDLE_S - (now - self.last_activity))
                if left <= 0 or self._too_slow(now):
                    raise DeadlineExceeded(
                        f"transfer abandoned: {len(self.missing)} of {self.offer.chunks} "
                        f"chunks missing after {now - self.started:.1f}s (sender quiet, too "
                        f"slow or out of time)"
                    )
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(self.done), min(left, CHECK_S))
        finally:
            await self.close()

    def _too_slow(self, now: float) -> bool:
        due = (now - self.started - RATE_GRACE_S) * MIN_RATE
        return self.received < min(due, self.offer.size)

    async def close(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            Receiver.active -= 1
            if self._budget is not None:
                self._budget.release(self.offer.size, self.sender)
            if not self.client.is_closed:
                await subscription.unsubscribe()
        if not self.done.done():
            self.done.cancel()
        self.buffer = bytearray()


async def _answer_error(client: NatsClient, reply: str, error: RequestError) -> None:
    if reply:
        body, headers = error_reply(error)
        await client.publish(reply, body, headers=headers)
