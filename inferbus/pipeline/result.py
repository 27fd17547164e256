"""What ``Client.infer`` returns: a model's named outputs and where they came from."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from inferbus.codecs import decode_response
from inferbus.errors import BadInput, EngineFailure


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


def read_result(data: bytes | bytearray, limit: int, attempts: int) -> InferResult:
    """Decode a success reply (at most ``limit`` bytes of tensors)."""
    try:
        response = decode_response(data, limit)
    except BadInput as exc:  # the worker broke the protocol; the caller's input was fine
        raise EngineFailure(f"malformed reply: {exc.message}") from exc
    return InferResult(
        response.outputs, response.model_name, response.model_version, response.id, attempts
    )
