"""What a model takes and returns: tensor names, V2 datatypes and shapes (-1 = any size)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from inferbus.codecs import BYTES, DATATYPES, datatype_of, numpy_dtype
from inferbus.errors import BadInput, ConfigError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ConfigError(f"tensor {self.name!r}: unsupported datatype {self.datatype!r}")
        if any(dim < -1 for dim in self.shape):
            raise ConfigError(f"tensor {self.name!r}: dimensions are -1 (any) or >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))

    def check(self, array: np.ndarray) -> None:
        """Raise BadInput unless ``array`` has this datatype, rank and fixed dimensions."""
        datatype = datatype_of(array)
        if datatype != self.datatype:
            raise BadInput(f"input {self.name!r} must be {self.datatype}, got {datatype}")
        shape = array.shape
        if len(shape) != len(self.shape):
            self._wrong_shape(shape)
        for want, got in zip(self.shape, shape, strict=True):
            if want != got and want != -1:
                self._wrong_shape(shape)

    def _wrong_shape(self, shape: tuple[int, ...]) -> NoReturn:
        raise BadInput(
            f"input {self.name!r} must have shape {_show(self.shape)}, got {list(shape)}"
        )

    def example(self, batch: int = 1) -> np.ndarray:
        """A zero-filled tensor of this spec, its free dimensions set to ``batch``."""
        shape = tuple(batch if dim == -1 else dim for dim in self.shape)
        if self.datatype == BYTES:
            return np.full(shape, b"", dtype=object)
        dtype = numpy_dtype(self.datatype)
        return np.zeros(shape, dtype=dtype)


def _show(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("*" if dim == -1 else str(dim) for dim in shape) + "]"


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        return cls(
            tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
            tuple(TensorSpec.from_dict(d) for d in data["outputs"]),
        )

    def check_inputs(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Raise BadInput unless ``tensors`` holds exactly this signature's inputs."""
        expected = {spec.name for spec in self.inputs}
        if len(tensors) != len(expected) or not expected.issuperset(tensors):
            missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
            raise BadInput(
                f"inputs must be {sorted(expected)}; missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for spec in self.inputs:
            spec.check(tensors[spec.name])

    def examples(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {spec.name: spec.example(batch) for spec in self.inputs}
