"""fp16: a float32 tensor sent as float16 (half the bytes), restored as float32 on arrival.

Lossy: about three significant digits survive, and magnitudes above 65504 become inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from inferbus.codecs.base import decoded_size
from inferbus.errors import BadInput


@dataclass(frozen=True, slots=True)
class Fp16:
    @property
    def name(self) -> str:
        return "fp16"

    def check(self, datatype: str, shape: tuple[int, ...]) -> None:
        if datatype != "FP32":
            raise BadInput(f"the fp16 codec carries FP32 tensors, not {datatype}")

    def encode(self, array: np.ndarray, datatype: str) -> bytes:
        self.check(datatype, array.shape)
        with np.errstate(over="ignore"):  # documented: beyond float16's range becomes inf
            return np.ascontiguousarray(array, dtype="<f2").tobytes()

    def decode(
        self, data: memoryview, datatype: str, shape: tuple[int, ...], limit: int
    ) -> np.ndarray:
        self.check(datatype, shape)
        decoded_size(datatype, shape, limit)
        count = math.prod(shape)
        if len(data) != 2 * count:
            raise BadInput(f"fp16 tensor of shape {list(shape)} needs {2 * count} bytes")
        half = np.frombuffer(data, dtype="<f2")
        return half.astype(np.float32).reshape(shape)


FP16: Final = Fp16()
