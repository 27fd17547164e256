"""Admission, the first part of a worker's request path: a request body becomes ``Work`` (or
a ``RequestError`` to answer at once) before anything is queued or computed.

Decode the V2 header and tensors within the model's byte limit, check them against the
signature, size the request in rows, key it for batching and fix its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import NamedTuple

from inferbus.codecs import (
    InferRequest,
    RequestHeader,
    decode_tensors,
    get_codec,
    read_request_header,
)
from inferbus.contract import Signature
from inferbus.errors import BadInput, PayloadTooLarge
from inferbus.pipeline._service import EndpointRecord
from inferbus.pipeline._threads import DECODE_OFF_LOOP_BYTES, run_in_thread
from inferbus.repository import ModelConfig


class Work(NamedTuple):
    """An admitted request: what to compute, how it batches, and where and by when to answer.
    (A NamedTuple: one is made per request on the hot path.)"""

    request: InferRequest
    rows: int
    key: Hashable  # requests with equal keys may share a batch
    deadline: float | None  # time.monotonic(); None: no budget given
    reply: str
    record: EndpointRecord
    received_ns: int  # time.perf_counter_ns() on arrival
    user: str = ""  # who sent it, on a shared bus (the server-written account)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def is_batched(signature: Signature) -> bool:
    """Every input's first dimension is free: requests can be stacked along it."""
    return bool(signature.inputs) and all(spec.shape[:1] == (-1,) for spec in signature.inputs)


class Admission:
    """Checks one model version's requests against its signature and limits."""

    def __init__(self, config: ModelConfig, signature: Signature) -> None:
        self.config = config
        self.signature = signature
        self.batched = is_batched(signature)
        self.output_names = frozenset(spec.name for spec in signature.outputs)

    async def admit(
        self,
        data: bytes | bytearray,
        reply: str,
        record: EndpointRecord,
        received_ns: int,
        user: str = "",
    ) -> Work:
        """The work a body asks for; raises the ``RequestError`` to answer instead.

        Everything the JSON header declares is checked before any tensor is decoded, and
        decoding that can expand (a codec, or a large body) runs off the event loop."""
        header = self.read_header(data)
        rows = self.check(header)
        limit = self.config.max_request_bytes
        if header.expands or len(data) > DECODE_OFF_LOOP_BYTES:
            request = await run_in_thread(None, decode_tensors, header, limit)
        else:
            request = decode_tensors(header, limit)
        timeout = request.timeout_us
        deadline = None if timeout is None else time.monotonic() + timeout / 1e6
        key = self.batch_key(request)
        return Work(request, rows, key, deadline, reply, record, received_ns, user)

    def read_header(self, data: bytes | bytearray) -> RequestHeader:
        limit = self.config.max_request_bytes
        if len(data) > limit:
            raise PayloadTooLarge(f"request of {len(data)} bytes exceeds max_request_bytes {limit}")
        return read_request_header(data)

    def check(self, header: RequestHeader) -> int:
        """Validate what the header declares against the signature and the limits; the
        request's batch size in rows."""
        self.signature.check_entries(header.tensors)
        if header.outputs and not self.output_names.issuperset(header.outputs):
            unknown = sorted(set(header.outputs) - self.output_names)
            raise BadInput(f"unknown outputs {unknown}; has {sorted(self.output_names)}")
        if header.reply_codec is not None:
            codec = get_codec(header.reply_codec)
            for spec in self.signature.outputs:  # fail now, not after computing
                if not header.outputs or spec.name in header.outputs:
                    codec.check(spec.datatype, tuple(max(dim, 1) for dim in spec.shape))
        rows = self._rows(header)
        needed, limit = header.decoded_bytes(), self.config.max_request_bytes
        if needed > limit:
            raise PayloadTooLarge(
                f"the tensors take {needed} bytes decoded; max_request_bytes is {limit}"
            )
        return rows

    def _rows(self, header: RequestHeader) -> int:
        if not self.batched:
            return 1
        sizes = {entry.shape[0] for entry in header.tensors}
        if len(sizes) != 1:
            raise BadInput(f"inputs disagree on the batch size: {sorted(sizes)}")
        rows: int = sizes.pop()
        if rows > self.config.max_batch_size:
            raise PayloadTooLarge(
                f"batch of {rows} exceeds max_batch_size {self.config.max_batch_size}"
            )
        return rows

    def batch_key(self, request: InferRequest) -> Hashable:
        """Requests batch together when everything but their first dimension matches."""
        if not self.batched:
            return object()  # unbatched models run each request alone
        shapes = sorted((name, array.shape[1:]) for name, array in request.inputs.items())
        return tuple(shapes), request.outputs
