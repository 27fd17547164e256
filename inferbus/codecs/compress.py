"""Lossless codecs: zstd (better ratio) and lz4 (faster), over the raw little-endian bytes."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Final

import lz4.frame
import numpy as np
import zstandard

from inferbus.codecs import raw
from inferbus.codecs._datatypes import BYTES
from inferbus.codecs.base import decoded_size
from inferbus.errors import BadInput, PayloadTooLarge


def _plain_size(declared: int, size: int, limit: int, name: str) -> int:
    """Check a frame's declared content size before anything is decompressed.

    ``size`` is what the shape needs (-1 for BYTES, whose size only the frame knows).
    """
    if declared < 0:
        raise BadInput(f"{name} frames must declare their content size")
    if size >= 0 and declared != size:
        raise BadInput(f"{name} frame holds {declared} bytes; the shape needs {size}")
    if declared > limit:
        raise PayloadTooLarge(f"{name} frame declares {declared} bytes; the limit is {limit}")
    return declared


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
        shaped = decoded_size(datatype, shape, limit)  # 413 before the data is looked at
        try:
            size = _plain_size(zstandard.frame_content_size(data), shaped, limit, "zstd")
            if datatype == BYTES:  # streamed: a frame may claim far more than the shape holds
                reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
                return raw.decode_bytes_from(reader.read, math.prod(shape), size).reshape(shape)
            plain = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=size, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise BadInput(f"zstd: {exc}") from exc
        if len(plain) != size:
            raise BadInput(f"zstd frame decompresses to {len(plain)} bytes, not {size}")
        return raw.decode(memoryview(plain), datatype, shape)


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
        shaped = decoded_size(datatype, shape, limit)  # 413 before the data is looked at
        compressed = bytes(data)
        try:
            stored = lz4.frame.get_frame_info(compressed)["content_size"]
        except RuntimeError as exc:  # lz4 reports corrupt frames as RuntimeError
            raise BadInput(f"lz4: {exc}") from exc
        # lz4 writes 0 both for "not stored" and for an empty tensor; the shape tells which.
        declared = stored if stored or not math.prod(shape) else -1
        size = _plain_size(declared, shaped, limit, "lz4")
        if datatype == BYTES:  # streamed: a frame may claim far more than the shape holds
            try:
                reader = lz4.frame.LZ4FrameFile(io.BytesIO(compressed))
                return raw.decode_bytes_from(reader.read, math.prod(shape), size).reshape(shape)
            except (RuntimeError, EOFError) as exc:
                raise BadInput(f"lz4: {exc}") from exc
        decompressor = lz4.frame.LZ4FrameDecompressor()
        try:
            plain = decompressor.decompress(compressed, max_length=size)
        except RuntimeError as exc:
            raise BadInput(f"lz4: {exc}") from exc
        if not decompressor.eof or decompressor.unused_data or len(plain) != size:
            raise BadInput("lz4 frame is truncated, longer than declared, or followed by data")
        return raw.decode(memoryview(plain), datatype, shape)


ZSTD: Final = Zstd()
LZ4: Final = Lz4()
