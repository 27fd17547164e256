"""The messages of a chunked transfer (docs/PROTOCOL.md section 13) and what both ends share:
the offer and the answer, both framed like a body; the headers that mark them; the transfer
subjects a worker names; and the rules a transfer subject keeps for whom it answers."""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from inferbus.contract import error_reply, reply_subject_problem, requester_account
from inferbus.errors import BadInput, Forbidden, InferbusError, RequestError

TRANSFER_HEADER: Final = "Inferbus-Transfer"
CHUNK_HEADER: Final = "Inferbus-Chunk"
OFFER: Final = "offer"
COMMIT: Final = "commit"  # Inferbus-Chunk of the request that ends a request's upload
CANCEL: Final = "cancel"  # Inferbus-Chunk of a client's "I will not fetch this reply"
TRANSFER_PREFIX: Final = "inferbus.transfer"
MAX_CHUNK: Final = 4 * 1024 * 1024
# The PUB line and headers must fit beside a chunk: Inferbus-Chunk, and on a shared bus the
# Nats-Request-Info header (~400 bytes) that nats-server adds to what crosses an import.
HEADROOM: Final = 4096
MAX_TRANSFER_S: Final = 120.0
MIN_CHUNK: Final = 4096  # bounds the bookkeeping a receiver keeps per offer
IDLE_S: Final = 10.0  # a transfer that hears nothing for this long is freed

_TRANSFER_SUBJECT: Final = re.compile(r"inferbus\.transfer\.[A-Za-z0-9_-]{1,64}")


def is_offer(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get(TRANSFER_HEADER) == OFFER  # type: ignore[union-attr]


def chunk_size(max_payload: int) -> int:
    if max_payload <= HEADROOM:
        raise InferbusError(f"the server's max_payload of {max_payload} bytes is too small")
    return min(max_payload - HEADROOM, MAX_CHUNK)


def new_transfer_subject() -> str:
    """``inferbus.transfer.<id>``: 128 random bits, one NATS token (``[A-Za-z0-9_-]``)."""
    return f"{TRANSFER_PREFIX}.{secrets.token_urlsafe(16)}"


def transfer_subject_problem(subject: str) -> str | None:
    """Why a client must not publish to ``subject`` a worker named, or None when it may."""
    if _TRANSFER_SUBJECT.fullmatch(subject):
        return None
    return f"{subject[:80]!r} is not a transfer subject ({TRANSFER_PREFIX}.<id>)"


@dataclass(frozen=True, slots=True)
class Offer:
    """What a sender announces: the body's size, how it is cut, and, for a reply, where its
    chunks are fetched."""

    size: int
    chunk_size: int
    timeout_s: float
    subject: str = ""  # replies only: the transfer subject that serves the chunks

    @property
    def chunks(self) -> int:
        return math.ceil(self.size / self.chunk_size)

    def span(self, index: int) -> slice:
        """Where chunk ``index`` lies in the body."""
        start = index * self.chunk_size
        return slice(start, min(start + self.chunk_size, self.size))

    def body(self) -> bytes:
        fields: dict[str, Any] = {
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "timeout_ms": max(1, int(self.timeout_s * 1e3)),
        }
        if self.subject:
            fields["subject"] = self.subject
        return framed({"transfer": fields})

    @classmethod
    def parse(cls, data: bytes) -> Offer:
        fields = transfer_json(data)
        size, chunk, timeout_ms = (fields.get(k) for k in ("size", "chunk_size", "timeout_ms"))
        subject = fields.get("subject", "")
        if not all(type(v) is int and v > 0 for v in (size, chunk, timeout_ms)):
            raise BadInput("transfer offer needs positive integer size, chunk_size, timeout_ms")
        if type(subject) is not str or fields.get("chunks") != math.ceil(size / chunk):  # type: ignore[operator]
            raise BadInput("transfer offer is inconsistent")
        if "reply" in fields:  # the protocol before commits: fail fast, not after a timeout
            raise BadInput(
                "transfer offer has a 'reply' field: this worker takes a commit instead "
                "(PROTOCOL.md section 13)"
            )
        if chunk < MIN_CHUNK and chunk < size:  # type: ignore[operator]
            raise BadInput(f"transfer chunks must be at least {MIN_CHUNK} bytes")
        return cls(size, chunk, min(timeout_ms / 1e3, MAX_TRANSFER_S), subject)  # type: ignore[arg-type, operator]


def framed(json: dict[str, Any]) -> bytes:
    text = orjson.dumps(json)
    return len(text).to_bytes(4, "little") + text


def transfer_json(data: bytes) -> dict[str, Any]:
    length = int.from_bytes(data[:4], "little")
    try:
        header = orjson.loads(data[4 : 4 + length])
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"transfer message is not JSON: {exc}") from exc
    fields = header.get("transfer") if isinstance(header, dict) else None
    if not isinstance(fields, dict):
        raise BadInput("transfer message lacks its 'transfer' object")
    return fields


FOREIGN: Final = "this transfer belongs to another account"


def foreign(owner: str | None, msg: Msg) -> bool:
    """A message on a transfer subject from another account than the transfer's (13.3)."""
    return owner is not None and requester_account(msg.headers) != owner


async def answer_error(client: NatsClient, reply: str, error: RequestError) -> None:
    """Answer ``error`` to ``reply``, unless nobody asked or the subject is refused (14)."""
    if reply and not reply_subject_problem(reply):
        body, headers = error_reply(error)
        await client.publish(reply, body, headers=headers)


async def refuse_foreign(client: NatsClient, msg: Msg) -> None:
    await answer_error(client, msg.reply, Forbidden(FOREIGN))
