"""What memory each TensorRT I/O tensor needs, worked out before anything is allocated, and
the checks that keep a call inside it.

Output sizes come from TensorRT itself, as NVIDIA's samples do it: set every input to its
profile maximum and read the shapes the execution context infers for the outputs. An output
whose size depends on the data (still -1 there) would need an ``IOutputAllocator``; such
models are refused at load rather than failing every call. Each call checks the shapes the
context infers for *its* inputs against those capacities before anything runs, so a kernel
never writes past a buffer. The logic here is plain Python and tested on CPU machines with a
stand-in context; the engine that calls it with a real one runs on GPU machines only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from inferbus.contract import TensorSpec
from inferbus.engines.tensorrt.profile import ProfileShapes, Shape
from inferbus.errors import ConfigError, EngineFailure


class ShapeContext(Protocol):
    """The two calls of ``tensorrt.IExecutionContext`` that shape inference needs."""

    def set_input_shape(self, name: str, shape: Shape) -> bool: ...

    def get_tensor_shape(self, name: str) -> Sequence[int]: ...


@dataclass(frozen=True, slots=True)
class IoTensor:
    """One I/O tensor: its wire spec, numpy type, profile (inputs) and the largest shape it
    can take, which its buffers are sized for."""

    spec: TensorSpec
    dtype: np.dtype[Any]
    profile: ProfileShapes | None
    capacity: Shape

    @property
    def is_input(self) -> bool:
        return self.profile is not None

    @property
    def nbytes(self) -> int:
        return max(math.prod(self.capacity) * self.dtype.itemsize, 1)


def require(ok: object, what: str, model: str = "") -> None:
    """TensorRT setters report failure by returning False (and a log line): never ignore it."""
    if ok is False or ok is None:
        raise EngineFailure(f"TensorRT refused {what}", model=model or None)


def set_input_shapes(context: ShapeContext, shapes: Mapping[str, Shape], model: str) -> None:
    for name, shape in shapes.items():
        require(context.set_input_shape(name, shape), f"input shape {name}={list(shape)}", model)


def largest_output_shapes(context: ShapeContext, profiles: Sequence[ProfileShapes],
                          outputs: Sequence[str], model: str) -> dict[str, Shape]:  # fmt: skip
    """Each output's shape with every input at its profile maximum; ConfigError for an output
    whose shape depends on the data."""
    set_input_shapes(context, {profile.name: profile.max for profile in profiles}, model)
    shapes = {name: tuple(int(d) for d in context.get_tensor_shape(name)) for name in outputs}
    unbounded = sorted(name for name, shape in shapes.items() if any(d < 0 for d in shape))
    if unbounded:
        raise ConfigError(
            f"{model}: outputs {unbounded} have data-dependent shapes (e.g. NonZero); the "
            "tensorrt engine sizes outputs ahead of time and does not serve those: use the "
            "onnxruntime engine for this model"
        )
    return shapes


def output_shapes_within(context: ShapeContext, outputs: Sequence[IoTensor], model: str
                         ) -> dict[str, Shape]:  # fmt: skip
    """The shapes this call's outputs will have (inputs already set), checked against the
    buffers before anything runs."""
    shapes: dict[str, Shape] = {}
    for tensor in outputs:
        name = tensor.spec.name
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        nbytes = math.prod(shape) * tensor.dtype.itemsize
        if any(d < 0 for d in shape) or nbytes > tensor.nbytes:
            raise EngineFailure(
                f"output {name!r} would have shape {list(shape)}, beyond the "
                f"{list(tensor.capacity)} its buffer holds",
                model=model,
            )
        shapes[name] = shape
    return shapes


def host_input(tensor: IoTensor, value: object) -> np.ndarray:
    """A request's input as a C-contiguous array of the engine's type, checked against the
    profile. Shape kept exactly: a 0-d input stays 0-d (``ascontiguousarray`` makes it 1-d)."""
    array = np.asarray(value, dtype=tensor.dtype, order="C")
    assert tensor.profile is not None
    tensor.profile.check(array.shape)  # a 400 here, not a CUDA error later
    return array


def refuse_host_tensors(name: str, *, shape_tensor: bool, on_host: bool, model: str) -> None:
    """Shape tensors and host-located I/O are read by TensorRT from host memory at enqueue
    time; the engine gives every tensor device memory, so it refuses those models clearly."""
    if shape_tensor or on_host:
        kind = "a shape tensor" if shape_tensor else "located in host memory"
        raise ConfigError(
            f"{model}: I/O tensor {name!r} is {kind}; the tensorrt engine serves device "
            "tensors only: use the onnxruntime engine for this model"
        )
