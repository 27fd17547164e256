"""The codec interface and the registry of codecs by wire name.

A codec turns one tensor into the bytes that follow the JSON header and back. Its name travels
as the tensor's ``parameters.codec``; raw (the default) is not written. Codecs are pure and
I/O-free. ``decode`` is given the largest size it may produce and refuses to allocate more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final, Protocol

import numpy as np

from inferbus.codecs._datatypes import numpy_dtype
from inferbus.errors import PayloadTooLarge


class Codec(Protocol):
    """How one tensor travels. Implementations hold only settings (e.g. JPEG quality)."""

    @property
    def name(self) -> str: ...

    def check(self, datatype: str, shape: tuple[int, ...]) -> None:
        """Raise BadInput unless this codec can carry such a tensor."""

    def encode(self, array: np.ndarray, datatype: str) -> bytes | memoryview: ...

    def decode(
        self, data: memoryview, datatype: str, shape: tuple[int, ...], limit: int
    ) -> np.ndarray:
        """The tensor; ``limit`` bounds the bytes it may allocate (PayloadTooLarge beyond)."""


def decoded_size(datatype: str, shape: tuple[int, ...], limit: int) -> int:
    """The bytes a fixed-size tensor takes once decoded; PayloadTooLarge above ``limit``.

    BYTES tensors have no fixed size: -1, and their codec enforces ``limit`` itself.
    """
    dtype = numpy_dtype(datatype)
    if dtype is None:
        return -1
    size = math.prod(shape) * dtype.itemsize
    if size > limit:
        raise PayloadTooLarge(f"a {datatype} tensor of shape {list(shape)} ({size} bytes) "
                              f"exceeds the limit of {limit} bytes")  # fmt: skip
    return size


CodecChoice = str | Codec
Choices = CodecChoice | Mapping[str, CodecChoice] | None
RAW: Final = "raw"
