"""The V2 datatype table as the tests expect it, written out independently of the code."""

from typing import Any

import numpy as np
import numpy.typing as npt

NUMERIC: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def random_array(datatype: str, shape: tuple[int, ...], seed: int = 0) -> npt.NDArray[Any]:
    """Values spread over the datatype's whole range (ints) or a wide range (floats)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(NUMERIC[datatype])
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(int(info.min), int(info.max), size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(size=shape) * 1000).astype(dtype)
