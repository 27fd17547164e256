"""The messages that open a chunked transfer (docs/PROTOCOL.md section 13): the offer a sender
makes and the receiver's answer, both framed like a body, and the headers that mark them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import orjson
from nats.aio.msg import Msg

from inferbus.contract import reply_subject_problem
from inferbus.errors import BadInput, InferbusError

TRANSFER_HEADER: Final = "Inferbus-Transfer"
CHUNK_HEADER: Final = "Inferbus-Chunk"
OFFER: Final = "offer"
MAX_CHUNK: Final = 4 * 1024 * 1024
HEADROOM: Final = 4096  # the PUB line and chunk header must fit beside the chunk
MAX_TRANSFER_S: Final = 120.0
MIN_CHUNK: Final = 4096  # bounds the bookkeeping a receiver keeps per offer


def is_offer(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get(TRANSFER_HEADER) == OFFER  # type: ignore[union-attr]


def chunk_size(max_payload: int) -> int:
    if max_payload <= HEADROOM:
        raise InferbusError(f"the server's max_payload of {max_payload} bytes is too small")
    return min(max_payload - HEADROOM, MAX_CHUNK)


@dataclass(frozen=True, slots=True)
class Offer:
    """What a sender announces: the body's size, how it is cut, and where replies go."""

    size: int
    chunk_size: int
    timeout_s: float
    reply: str = ""  # requests only: where the worker sends the response

    @property
    def chunks(self) -> int:
        return math.ceil(self.size / self.chunk_size)

    def body(self) -> bytes:
        fields: dict[str, Any] = {
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "timeout_ms": max(1, int(self.timeout_s * 1e3)),
        }
        if self.reply:
            fields["reply"] = self.reply
        json = orjson.dumps({"transfer": fields})
        return len(json).to_bytes(4, "little") + json

    @classmethod
    def parse(cls, data: bytes) -> Offer:
        fields = transfer_json(data)
        size, chunk, timeout_ms = (fields.get(k) for k in ("size", "chunk_size", "timeout_ms"))
        reply = fields.get("reply", "")
        if not all(type(v) is int and v > 0 for v in (size, chunk, timeout_ms)):
            raise BadInput("transfer offer needs positive integer size, chunk_size, timeout_ms")
        if type(reply) is not str or fields.get("chunks") != math.ceil(size / chunk):  # type: ignore[operator]
            raise BadInput("transfer offer is inconsistent")
        problem = reply_subject_problem(reply) if reply else None
        if problem:
            raise BadInput(f"transfer reply subject refused: {problem}")
        if chunk < MIN_CHUNK and chunk < size:  # type: ignore[operator]
            raise BadInput(f"transfer chunks must be at least {MIN_CHUNK} bytes")
        return cls(size, chunk, min(timeout_ms / 1e3, MAX_TRANSFER_S), reply)  # type: ignore[arg-type, operator]


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
