"""The raw codec: tensors as their little-endian bytes, decoded without a copy.

BYTES tensors follow Triton's layout: each element, in row-major order, is a 4-byte
little-endian length followed by that many bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Final

import numpy as np

from inferbus.codecs._datatypes import BYTES, numpy_dtype
from inferbus.errors import BadInput

NAME = "raw"
_LENGTH = struct.Struct("<I")


def encode(array: np.ndarray, datatype: str) -> bytes | memoryview:
    """The wire bytes of ``array``; a view of its memory when it is already contiguous LE."""
    if datatype == BYTES:
        return _encode_bytes(array)
    contiguous = np.ascontiguousarray(array, dtype=numpy_dtype(datatype))  # ndim >= 1
    return contiguous.data.cast("B") if contiguous.size else b""


def decode(data: memoryview, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor of ``shape`` read from ``data``; numeric tensors share its memory (read-only)."""
    count = math.prod(shape)
    if datatype == BYTES:
        return _decode_bytes(data, count).reshape(shape)
    dtype = numpy_dtype(datatype)
    assert dtype is not None
    if count * dtype.itemsize != len(data):
        raise BadInput(
            f"{datatype} tensor of shape {list(shape)} needs {count * dtype.itemsize} bytes, "
            f"got {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise BadInput("BOOL tensor holds a byte other than 0 or 1")
    return array


def _as_bytes(element: object) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode()
    if isinstance(element, np.bytes_ | np.str_):
        return _as_bytes(element.item())
    raise BadInput(f"BYTES tensors hold str or bytes, not {type(element).__name__}")


def _encode_bytes(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for element in array.ravel(order="C").tolist():
        value = _as_bytes(element)
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def _decode_bytes(data: memoryview, count: int) -> np.ndarray:
    # Each element takes at least its 4-byte length: checked before the array is allocated.
    if count * _LENGTH.size > len(data):
        raise BadInput(f"BYTES tensor of {count} elements cannot fit in {len(data)} bytes")
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + _LENGTH.size > len(data):
            raise BadInput("BYTES tensor is truncated")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            raise BadInput("BYTES element runs past the end of its tensor")
        out[index] = bytes(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise BadInput(f"BYTES tensor has {len(data) - offset} bytes left over")
    return out


def decode_bytes_from(read: Callable[[int], bytes], count: int, size: int) -> np.ndarray:
    """``count`` BYTES elements read from a stream (a decompressor's) that declared ``size``
    bytes, never reading past them: each element's length is checked against what is left of
    ``size`` before it is read, and data left over after the last element is refused after one
    byte. ``size`` is already within the caller's memory limit."""
    out = np.empty(count, dtype=object)
    left = size
    for index in range(count):
        (length,) = _LENGTH.unpack(_read_exactly(read, _LENGTH.size))
        left -= _LENGTH.size + length
        if left < 0:
            raise BadInput("BYTES element runs past the end of its tensor")
        out[index] = _read_exactly(read, length)
    if read(1):
        raise BadInput("BYTES tensor has data left over after its last element")
    return out


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    parts, missing = [], size
    while missing:
        part = read(missing)
        if not part:
            raise BadInput("BYTES tensor is truncated")
        parts.append(part)
        missing -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class Raw:
    """The default codec as a ``Codec`` object, for code that handles codecs uniformly."""

    name = NAME

    def check(self, datatype: str, shape: tuple[int, ...]) -> None:
        """Every datatype travels raw."""

    def encode(self, array: np.ndarray, datatype: str) -> bytes | memoryview:
        return encode(array, datatype)

    def decode(
        self, data: memoryview, datatype: str, shape: tuple[int, ...], limit: int
    ) -> np.ndarray:
        return decode(data, datatype, shape)


RAW_CODEC: Final = Raw()
