"""Bodies larger than the server's max_payload, moved in chunks (docs/PROTOCOL.md section 13).

The client always asks and the worker always answers, so that a transfer works across NATS
accounts (a user's and the workers') as it does on an open bus:

- a request: the client offers it on the model subject; the worker that takes it answers with
  a transfer subject (``inferbus.transfer.<id>``); the client sends each chunk there as a
  request (``Inferbus-Chunk: <index> <crc32>``, a window of them in flight, each acknowledged)
  and then a commit, which the worker answers with the final reply;
- a reply: the worker's reply is an offer naming a transfer subject, and the client fetches
  each chunk there (``Inferbus-Chunk: <index>``), checks it, and assembles the body.

This module is the client's side; the worker's is ``Receiver`` (requests) and
``ReplyServer`` (replies), re-exported here.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from inferbus.contract import error_from_reply
from inferbus.errors import (
    BadInput,
    DeadlineExceeded,
    EngineFailure,
    PayloadTooLarge,
    Unavailable,
)
from inferbus.pipeline._offer import CANCEL as CANCEL
from inferbus.pipeline._offer import CHUNK_HEADER as CHUNK_HEADER
from inferbus.pipeline._offer import COMMIT as COMMIT
from inferbus.pipeline._offer import MAX_TRANSFER_S as MAX_TRANSFER_S
from inferbus.pipeline._offer import OFFER as OFFER
from inferbus.pipeline._offer import TRANSFER_HEADER as TRANSFER_HEADER
from inferbus.pipeline._offer import Offer as Offer
from inferbus.pipeline._offer import chunk_size as chunk_size
from inferbus.pipeline._offer import is_offer as is_offer
from inferbus.pipeline._offer import transfer_json as transfer_json
from inferbus.pipeline._offer import transfer_subject_problem
from inferbus.pipeline._receiver import Receiver as Receiver
from inferbus.pipeline._receiver import TransferBudget as TransferBudget
from inferbus.pipeline._receiver import sender_of as sender_of
from inferbus.pipeline._reply_server import ReplyServer as ReplyServer
from inferbus.pipeline.nats_errors import nats_errors

WINDOW: Final = 8  # chunks in flight: measured faster than one message, without flooding
CHUNK_ACK_S: Final = 5.0  # a 4 MiB chunk takes well under 0.1 s here


def _raise_if_error(msg: Msg, context: str) -> None:
    error = error_from_reply(msg.headers, msg.data)
    if error is not None:
        raise type(error)(f"{context}: {error.message}")


async def send(client: NatsClient, subject: str, body: bytes, *, timeout: float) -> Msg:
    """Send ``body`` to the worker that takes it on ``subject``, in chunks, and commit it: the
    final reply (which may itself offer a reply transfer: ``fetch`` it).

    Nobody listening on ``subject`` is ``ModelNotFound``; a worker that goes away half-way is
    ``Unavailable``; no final reply within ``timeout`` is ``DeadlineExceeded``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    target = await upload(client, subject, body, timeout=timeout)
    left = max(deadline - loop.time(), 0.001)
    with nats_errors(target, left, nobody=Unavailable):
        return await client.request(target, b"", timeout=left, headers={CHUNK_HEADER: COMMIT})


async def upload(client: NatsClient, subject: str, body: bytes, *, timeout: float) -> str:
    """Offer ``body`` on ``subject`` and send every chunk to the worker that accepts it; its
    transfer subject, ready for the commit. Raises on any refusal."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    offer = Offer(len(body), chunk_size(client.max_payload), timeout)
    with nats_errors(subject, timeout):
        answer = await client.request(
            subject, offer.body(), timeout=timeout, headers={TRANSFER_HEADER: OFFER}
        )
    _raise_if_error(answer, "transfer refused")
    named = transfer_json(answer.data).get("subject")
    target = named if isinstance(named, str) else ""
    problem = transfer_subject_problem(target)
    if problem:
        raise EngineFailure(f"malformed reply: the transfer answer's subject: {problem}")
    view = memoryview(body)

    async def one(index: int) -> None:
        part = view[offer.span(index)]
        headers = {CHUNK_HEADER: f"{index} {zlib.crc32(part)}"}
        # A worker that died leaves chunks in flight unanswered: each gets a time limit.
        left = min(max(deadline - loop.time(), 0.001), CHUNK_ACK_S)
        try:
            with nats_errors(target, left, nobody=Unavailable):
                ack = await client.request(target, part, timeout=left, headers=headers)  # type: ignore[arg-type]
        except DeadlineExceeded:
            raise Unavailable(
                f"chunk {index} was not acknowledged within {left:g}s: the receiver went away"
            ) from None
        _raise_if_error(ack, f"chunk {index}")

    await _in_window(offer.chunks, one)
    return target


async def fetch(
    client: NatsClient,
    msg: Msg,
    limit: int,
    *,
    timeout: float,
    budget: TransferBudget | None = None,
) -> bytearray:
    """The body of the reply that ``msg`` offers, fetched chunk by chunk (a window of them in
    flight) and checked; 413 (and a cancel to the worker) when it is above ``limit`` or would
    take ``budget`` past its limit."""
    try:
        offer = Offer.parse(msg.data)
    except BadInput as exc:
        raise EngineFailure(f"malformed reply: {exc.message}") from None
    problem = transfer_subject_problem(offer.subject)
    if problem:
        raise EngineFailure(f"malformed reply: {problem}")
    refusal = None
    if offer.size > limit:
        refusal = f"transfer of {offer.size} bytes exceeds the limit {limit}"
    elif budget is not None and not budget.reserve(offer.size):
        refusal = (
            f"reply transfers in progress would exceed max_reply_bytes_in_flight ({budget.limit})"
        )
    if refusal is not None:
        if not client.is_closed:  # fire and forget: the worker frees the reply now
            await client.publish(offer.subject, b"", headers={CHUNK_HEADER: CANCEL})
        raise PayloadTooLarge(refusal)
    try:
        return await _pull(client, offer, min(timeout, offer.timeout_s))
    finally:
        if budget is not None:
            budget.release(offer.size)


async def _pull(client: NatsClient, offer: Offer, timeout: float) -> bytearray:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = bytearray()  # allocated at the first chunk; the size was checked

    async def one(index: int) -> None:
        nonlocal body
        left = deadline - loop.time()
        if left <= 0:
            raise DeadlineExceeded(f"the reply did not arrive within {timeout:g}s")
        wait = min(left, CHUNK_ACK_S)
        try:
            with nats_errors(offer.subject, wait, nobody=Unavailable):
                reply = await client.request(
                    offer.subject, b"", timeout=wait, headers={CHUNK_HEADER: str(index)}
                )
        except DeadlineExceeded:
            if wait < CHUNK_ACK_S:  # the whole reply's time ran out, not the worker
                raise DeadlineExceeded(f"the reply did not arrive within {timeout:g}s") from None
            raise Unavailable(
                f"chunk {index} was not sent within {wait:g}s: the worker went away"
            ) from None
        _raise_if_error(reply, f"chunk {index}")
        span = _check_chunk(offer, index, reply)
        if not body:
            body = bytearray(offer.size)
        body[span] = reply.data

    await _in_window(offer.chunks, one)
    return body


def _check_chunk(offer: Offer, index: int, reply: Msg) -> slice:
    """Where a fetched chunk goes, once its header, length and checksum are right."""
    header = (reply.headers or {}).get(CHUNK_HEADER, "")
    index_text, _, crc_text = header.partition(" ")
    span = offer.span(index)
    if index_text != str(index) or not (crc_text.isascii() and crc_text.isdigit()):
        raise EngineFailure(f"malformed reply: chunk {index} came with {CHUNK_HEADER} {header!r}")
    if len(reply.data) != span.stop - span.start:
        raise EngineFailure(
            f"malformed reply: chunk {index} has {len(reply.data)} bytes; "
            f"expected {span.stop - span.start}"
        )
    if zlib.crc32(reply.data) != int(crc_text):
        raise EngineFailure(f"malformed reply: chunk {index} fails its checksum")
    return span


async def _in_window(count: int, one: Callable[[int], Awaitable[None]]) -> None:
    """``one(0)`` … ``one(count - 1)``, ``WINDOW`` at a time; the first failure cancels the
    rest and is raised."""
    gate = asyncio.Semaphore(WINDOW)

    async def gated(index: int) -> None:
        async with gate:
            await one(index)

    try:
        async with asyncio.TaskGroup() as group:
            for index in range(count):
                group.create_task(gated(index))
    except BaseExceptionGroup as group_error:
        raise _first_error(group_error) from None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The failure that stopped the transfer (the rest were cancelled because of it)."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first
