"""Open Inference Protocol (KServe V2) datatype names and their numpy dtypes."""

from __future__ import annotations

from typing import Final

import numpy as np

from inferbus.errors import BadInput

# Little-endian on the wire, whatever the host: the dtypes below say so explicitly.
_NUMERIC: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES: Final = "BYTES"
DATATYPES: Final[frozenset[str]] = frozenset([*_NUMERIC, BYTES])

_BY_KIND_SIZE: Final[dict[tuple[str, int], str]] = {
    (dtype.kind, dtype.itemsize): name for name, dtype in _NUMERIC.items()
}


def numpy_dtype(datatype: str) -> np.dtype[np.generic] | None:
    """The little-endian numpy dtype of a fixed-size V2 datatype; None for BYTES."""
    if datatype == BYTES:
        return None
    try:
        return _NUMERIC[datatype]
    except KeyError:
        known = ", ".join(sorted(DATATYPES))
        raise BadInput(f"unknown datatype {datatype!r}; expected one of {known}") from None


_BY_DTYPE: Final[dict[np.dtype[np.generic], str]] = {
    dtype: name for name, dtype in _NUMERIC.items()
}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name for a numpy array (str, bytes and object arrays are BYTES)."""
    name = _BY_DTYPE.get(array.dtype)  # the common case: a native little-endian dtype
    if name is not None:
        return name
    kind = array.dtype.kind
    if kind in "USO":
        return BYTES
    name = _BY_KIND_SIZE.get((kind, array.dtype.itemsize))
    if name is None:
        raise BadInput(f"numpy dtype {array.dtype} has no V2 datatype")
    return name
