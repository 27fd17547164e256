"""jpeg: uint8 images (HWC or NHWC, 1 or 3 channels) as JPEG, via libjpeg-turbo (simplejpeg).

Wire layout: for each image, a 4-byte little-endian length and that many bytes of JPEG.
Lossy: the usual JPEG error, a mean of about 4-6 grey levels on photographs at quality 75.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import simplejpeg

from inferbus.codecs.base import decoded_size
from inferbus.errors import BadInput

_LENGTH = struct.Struct("<I")
_COLORSPACE = {1: "GRAY", 3: "RGB"}
MAX_SIDE = 65500  # libjpeg-turbo's limit


def _images(shape: tuple[int, ...]) -> int:
    return 1 if len(shape) == 3 else shape[0]


@dataclass(frozen=True, slots=True)
class Jpeg:
    quality: int = 75  # libjpeg's own default: ~12x smaller than raw on photographs

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise BadInput("JPEG quality runs from 1 to 100")

    @property
    def name(self) -> str:
        return "jpeg"

    def check(self, datatype: str, shape: tuple[int, ...]) -> None:
        if datatype != "UINT8" or len(shape) not in (3, 4) or shape[-1] not in _COLORSPACE:
            raise BadInput(
                f"the jpeg codec carries UINT8 images shaped [H, W, C] or [N, H, W, C] with "
                f"C = 1 or 3, not {datatype} {list(shape)}"
            )
        if not all(1 <= side <= MAX_SIDE for side in shape[-3:-1]):
            raise BadInput(f"JPEG images are 1 to {MAX_SIDE} pixels a side, not {list(shape)}")

    def encode(self, array: np.ndarray, datatype: str) -> bytes:
        self.check(datatype, array.shape)
        batch = array.reshape((-1, *array.shape[-3:]))
        colorspace = _COLORSPACE[array.shape[-1]]
        sampling = "Gray" if colorspace == "GRAY" else "420"
        parts: list[bytes] = []
        for image in batch:
            encoded = simplejpeg.encode_jpeg(
                np.ascontiguousarray(image), self.quality, colorspace, sampling
            )
            parts += [_LENGTH.pack(len(encoded)), encoded]
        return b"".join(parts)

    def decode(
        self, data: memoryview, datatype: str, shape: tuple[int, ...], limit: int
    ) -> np.ndarray:
        self.check(datatype, shape)
        decoded_size(datatype, shape, limit)
        height, width, channels = shape[-3:]
        count = _images(shape)
        if count * _LENGTH.size > len(data):
            raise BadInput(f"jpeg data is too short for {count} images")
        out = np.empty((count, height, width, channels), dtype=np.uint8)
        offset = 0
        for index in range(count):
            offset = self._decode_one(data, offset, out[index])
        if offset != len(data):
            raise BadInput(f"jpeg data has {len(data) - offset} bytes left over")
        return out.reshape(shape)

    def _decode_one(self, data: memoryview, offset: int, target: np.ndarray) -> int:
        if offset + _LENGTH.size > len(data):
            raise BadInput("jpeg data is truncated")
        length: int = _LENGTH.unpack_from(data, offset)[0]
        start, end = offset + _LENGTH.size, offset + _LENGTH.size + length
        if end > len(data):
            raise BadInput("a JPEG image runs past the end of its tensor")
        image = data[start:end]
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(image)
            # The header is checked before anything is decoded into the preallocated array.
            if (height, width) != target.shape[:2]:
                raise BadInput(f"JPEG is {height}x{width}, the shape says "
                               f"{target.shape[0]}x{target.shape[1]}")  # fmt: skip
            colorspace = _COLORSPACE[target.shape[2]]
            simplejpeg.decode_jpeg(image, colorspace, buffer=target)
        except BadInput:
            raise
        except ValueError as exc:  # simplejpeg reports corrupt data as ValueError
            raise BadInput(f"jpeg: {exc}") from exc
        return end


JPEG: Final = Jpeg()
