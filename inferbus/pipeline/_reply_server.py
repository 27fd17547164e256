"""A worker's side of a reply sent in chunks (docs/PROTOCOL.md section 13.2): the reply is one
offer naming a transfer subject, and the worker keeps the encoded body and answers each fetch
there with one chunk, until every chunk was fetched, the client cancels, or time runs out.
Every message it sends is the one reply to a message it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from inferbus.contract import reply_subject_problem
from inferbus.errors import BadInput, DeadlineExceeded, PayloadTooLarge, RequestError
from inferbus.pipeline._offer import (
    CANCEL,
    CHUNK_HEADER,
    IDLE_S,
    OFFER,
    TRANSFER_HEADER,
    Offer,
    answer_error,
    chunk_size,
    foreign,
    new_transfer_subject,
    refuse_foreign,
)


class ReplyServer:
    """One large reply, served chunk by chunk to whoever fetches it: only the account that
    asked for it, when known (``owner``, 13.3)."""

    active: int = 0  # reply transfers in progress in this process, for tests and stats

    def __init__(
        self, client: NatsClient, body: bytes, *, timeout_s: float, owner: str | None = None
    ) -> None:
        self.client = client
        size = chunk_size(client.max_payload)
        self.offer = Offer(len(body), size, timeout_s, new_transfer_subject())
        self.owner = owner
        self.started = time.monotonic()
        self.last_activity = self.started
        self._body = memoryview(body)
        self._unfetched = set(range(self.offer.chunks))
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscription: Subscription | None = None
        self._closed = False

    async def offer_to(self, reply: str) -> None:
        """Subscribe the transfer subject, then send the offer: the one reply to ``reply``."""
        ReplyServer.active += 1
        try:
            self._subscription = await self.client.subscribe(self.offer.subject, cb=self._on_fetch)
            await self.client.publish(reply, self.offer.body(), headers={TRANSFER_HEADER: OFFER})
        except BaseException:
            await self.close()
            raise

    async def _on_fetch(self, msg: Msg) -> None:
        if self._ended.done():
            return
        if foreign(self.owner, msg):  # another account: refused, nothing changes
            await refuse_foreign(self.client, msg)
            return
        header = (msg.headers or {}).get(CHUNK_HEADER, "")
        if header == CANCEL:
            self._end(PayloadTooLarge("the caller refused the reply (cancel)"))
            return
        if reply_subject_problem(msg.reply):  # nowhere a chunk may go
            return
        try:
            index = self._index(header)
        except RequestError as exc:
            await answer_error(self.client, msg.reply, exc)
            self._end(exc)
            return
        part = self._body[self.offer.span(index)]
        self.last_activity = time.monotonic()
        # nats-py sends a memoryview as is (its type says bytes): no copy of the chunk here.
        headers = {CHUNK_HEADER: f"{index} {zlib.crc32(part)}"}
        await self.client.publish(msg.reply, part, headers=headers)  # type: ignore[arg-type]
        self._unfetched.discard(index)
        if not self._unfetched:
            self._end(None)

    def _index(self, header: str) -> int:
        if not (header.isascii() and header.isdigit()):
            raise BadInput(f"fetch lacks a valid {CHUNK_HEADER} header")
        index = int(header)
        if index >= self.offer.chunks:
            raise BadInput(f"chunk {index} is past the last one ({self.offer.chunks - 1})")
        return index

    def _end(self, error: RequestError | None) -> None:
        if not self._ended.done():
            if error is None:
                self._ended.set_result(None)
            else:
                self._ended.set_exception(error)

    async def serve(self) -> None:
        """Return once every chunk was fetched; raise the cancel (413), the fetch's error, or
        DeadlineExceeded when nobody fetched for ``IDLE_S`` or the offer's time ran out;
        always frees the body."""
        deadline = self.started + self.offer.timeout_s
        try:
            while True:
                now = time.monotonic()
                left = min(deadline - now, IDLE_S - (now - self.last_activity))
                if left <= 0:
                    raise DeadlineExceeded(
                        f"reply transfer abandoned: {len(self._unfetched)} of "
                        f"{self.offer.chunks} chunks not fetched after {now - self.started:.1f}s"
                    )
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(self._ended), left)
        finally:
            await self.close()

    async def close(self) -> None:
        """Unsubscribe and drop the body (once)."""
        if self._closed:
            return
        self._closed = True
        if not self._ended.done():
            self._ended.cancel()
        elif not self._ended.cancelled():
            self._ended.exception()  # retrieved: no "never retrieved" warning
        self._body = memoryview(b"")
        subscription, self._subscription = self._subscription, None
        try:
            if subscription is not None and not self.client.is_closed:
                await subscription.unsubscribe()
        finally:
            ReplyServer.active -= 1  # last: whoever sees 0 sees everything freed
