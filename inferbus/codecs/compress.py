"""Lossless codecs: zstd (better ratio) and lz4 (faster), over the raw little-endian bytes."""

from __future__ import annotations

from dataclasses import dataclass

import lz4.frame
import numpy as np
import zstandard

from inferbus.codecs import raw
from inferbus.codecs.base import decoded_size, register
from inferbus.errors import BadInput, PayloadTooLarge


def _expected(datatype: str, shape: tuple[int, ...], limit: int) -> tuple[int, int]:
    """(exact size, or -1 for BYTES; the most the decompressor may produce)."""
    size = decoded_size(datatype, shape, limit)
    return size, (size if size >= 0 else limit)


def _checked(data: bytes, size: int, name: str) -> memoryview:
    if size >= 0 and len(data) != size:
        raise BadInput(f"{name} data decompresses to {len(data)} bytes, not {size}")
    return memoryview(data)


@dataclass(frozen=True, slots=True)
class Zstd:
    level: int = 3

    @property
    def name(self) -> str:
        return "zstd"

    def check(self, datatype: str, shape: tuple[int, ...]) -> None:
        """Every datatype compresses."""

    def encode(self, array: np.ndarray, datatype: str) -> bytes:
        # A compressor object is not thread-safe; engines encode on several threads.
        return zstandard.ZstdCompressor(level=self.level).compress(raw.encode(array, datatype))

    def decode(
        self, data: memoryview, datatype: str, shape: tuple[int, ...], limit: int
    ) -> np.ndarray:
        size, most = _expected(datatype, shape, limit)
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise BadInput(f"zstd: {exc}") from exc
        if declared > most:  # checked before the decompressor allocates it
            raise PayloadTooLarge(f"zstd frame declares {declared} bytes; at most {most} allowed")
        try:
            plain = zstandard.ZstdDecompressor().decompress(data, max_output_size=most)
        except zstandard.ZstdError as exc:
            raise BadInput(f"zstd: {exc}") from exc
        return raw.decode(_checked(plain, size, "zstd"), datatype, shape)


@dataclass(frozen=True, slots=True)
class Lz4:
    @property
    def name(self) -> str:
        return "lz4"

    def check(self, datatype: str, shape: tuple[int, ...]) -> None:
        """Every datatype compresses."""

    def encode(self, array: np.ndarray, datatype: str) -> bytes:
        return bytes(lz4.frame.compress(raw.encode(array, datatype), store_size=True))

    def decode(
        self, data: memoryview, datatype: str, shape: tuple[int, ...], limit: int
    ) -> np.ndarray:
        size, most = _expected(datatype, shape, limit)
        decompressor = lz4.frame.LZ4FrameDecompressor()
        try:
            # One byte more than allowed tells "too large" from "exactly the limit".
            plain = decompressor.decompress(bytes(data), max_length=most + 1)
        except RuntimeError as exc:  # lz4 reports corrupt frames as RuntimeError
            raise BadInput(f"lz4: {exc}") from exc
        if len(plain) > most:
            raise PayloadTooLarge(f"lz4 data decompresses past {most} bytes")
        if not decompressor.eof:
            raise BadInput("lz4 frame is truncated")
        return raw.decode(_checked(plain, size, "lz4"), datatype, shape)


ZSTD = register(Zstd())
LZ4 = register(Lz4())
