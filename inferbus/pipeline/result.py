"""What ``Client.infer`` returns: a model's named outputs and where they came from."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from inferbus.codecs import decode_response
from inferbus.errors import BadInput, EngineFailure
from inferbus.pipeline._threads import DECODE_OFF_LOOP_BYTES

# A tensor with a codec names it in the JSON header: such replies are decoded off the loop.
_COMPRESSED: Final = b'"codec"'


@dataclass(frozen=True, slots=True, eq=False)  # arrays have no single truth value to compare
class InferResult(Mapping[str, np.ndarray]):
    """A model's named outputs (a read-only mapping) and where they came from."""

    outputs: Mapping[str, np.ndarray]
    model_name: str
    model_version: str
    id: str = ""
    attempts: int = 1  # how many times the client sent it (retries are within the budget)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    @property
    def output(self) -> np.ndarray:
        """The only output, for single-output models."""
        if len(self.outputs) != 1:
            raise KeyError(f"model has outputs {list(self.outputs)}; pick one by name")
        return next(iter(self.outputs.values()))


def needs_thread(data: bytes | bytearray) -> bool:
    """Is a reply large or compressed (it may inflate up to the limit)? Decode it off the loop."""
    return (
        len(data) > DECODE_OFF_LOOP_BYTES or data.find(_COMPRESSED, 4, 4 + _json_length(data)) >= 0
    )


def _json_length(data: bytes | bytearray) -> int:
    return int.from_bytes(data[:4], "little")


def read_result(data: bytes | bytearray, request_id: str, limit: int, attempts: int) -> InferResult:
    """Decode a success reply (at most ``limit`` bytes of tensors) to request ``request_id``."""
    try:
        response = decode_response(data, limit)
    except BadInput as exc:  # the worker broke the protocol; the caller's input was fine
        raise EngineFailure(f"malformed reply: {exc.message}") from exc
    if response.id != request_id:  # a stray or forged reply must not pass for ours
        raise EngineFailure(f"reply id {response.id[:64]!r} is not the request's {request_id!r}")
    return InferResult(
        response.outputs, response.model_name, response.model_version, response.id, attempts
    )
