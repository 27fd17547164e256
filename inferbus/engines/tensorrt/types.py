"""TensorRT datatypes and V2 names."""

from __future__ import annotations

from typing import Any

from inferbus.errors import ConfigError

_V2_BY_TRT_NAME = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}


def datatype_of_trt(trt: Any, dtype: Any) -> str:
    """The V2 name of a ``trt.DataType``; BF16, FP8 and INT4 have no numpy type here."""
    name = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]
    try:
        return _V2_BY_TRT_NAME[name]
    except KeyError:
        raise ConfigError(f"TensorRT datatype {name} is not supported on the wire") from None
