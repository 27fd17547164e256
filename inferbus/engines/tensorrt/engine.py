"""The TensorRT engine: one deserialized plan per process, shared by a model's instances; per
instance one execution context on its own optimization profile, one non-blocking CUDA stream,
and pinned host and device buffers sized once for the profile's largest shapes.

TensorRT 10.12+ / 11 API only (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). Runs on NVIDIA GPU nodes only. On this project's CPU machines its cache,
profile, output sizing and shape checks are tested (tests/test_tensorrt_*.py); the CUDA calls,
the shared plan and the profile per context are checked on GPU machines by scripts/gpu_check.py.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferbus.codecs import numpy_dtype
from inferbus.contract import Signature, Tensors, TensorSpec
from inferbus.engines.base import Engine
from inferbus.engines.shared import Lease, SharedLoads
from inferbus.engines.tensorrt.build import ensure_plan, import_tensorrt
from inferbus.engines.tensorrt.cuda import check, cudart
from inferbus.engines.tensorrt.io import (
    IoTensor,
    host_input,
    largest_output_shapes,
    output_shapes_within,
    refuse_host_tensors,
    require,
    set_input_shapes,
)
from inferbus.engines.tensorrt.profile import ProfileShapes
from inferbus.engines.tensorrt.types import datatype_of_trt
from inferbus.errors import ConfigError

#: deserialized plans (runtime, engine) by plan file, leased by instances; slot = profile index
PLANS: SharedLoads[tuple[Any, Any]] = SharedLoads()


@dataclass(slots=True)
class _Buffer:
    """One I/O tensor's memory: pinned host (as a numpy view) and device, sized for the max."""

    tensor: IoTensor
    host_pointer: int
    device_pointer: int
    host: np.ndarray  # uint8 view over the pinned host memory


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def load(self) -> None:
        self._frees: list[Callable[[], None]] = []  # undone in reverse by close()
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        trt = import_tensorrt()
        self._cuda = cudart()
        build = self.config.options.get("on_cache_miss", "build") != "refuse"
        plan = ensure_plan(self.config, build=build)
        lease = PLANS.acquire(plan, lambda: _deserialize(trt, plan), slots=self.config.instances)
        self._profile, (_, engine) = lease.slot, lease.value
        self._engine = engine
        self._frees.append(lambda: self._release_plan(lease))
        stream = check(self._cuda.cudaStreamCreateWithFlags(self._cuda.cudaStreamNonBlocking),
                       "cudaStreamCreateWithFlags")  # fmt: skip
        self._frees.append(lambda: check(self._cuda.cudaStreamDestroy(stream), "cudaStreamDestroy"))
        self._stream = stream
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ConfigError(f"{self.config.name}: TensorRT could not create a context")
        self._frees.append(self._drop_context)  # before the plan's lease is given back
        require(self._context.set_optimization_profile_async(self._profile, stream),
                f"optimization profile {self._profile}", self.config.name)  # fmt: skip
        tensors = self._describe(trt)
        self._buffers = [self._allocate(tensor) for tensor in tensors]
        for buffer in self._buffers:
            name = buffer.tensor.spec.name
            placed = self._context.set_tensor_address(name, buffer.device_pointer)
            require(placed, f"the address of {name}", self.config.name)
        self._inputs = [b for b in self._buffers if b.tensor.is_input]
        self._outputs = [b for b in self._buffers if not b.tensor.is_input]
        inputs = tuple(b.tensor.spec for b in self._inputs)
        self.signature = Signature(inputs, tuple(b.tensor.spec for b in self._outputs))
        self.device = "cuda"

    def _describe(self, trt: Any) -> list[IoTensor]:
        """Every I/O tensor with its capacity (see io.py); refuses what the engine can't serve."""
        engine, model = self._engine, self.config.name
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        specs, profiles = {}, {}
        for name in names:
            on_host = engine.get_tensor_location(name) == trt.TensorLocation.HOST
            shape_tensor = bool(engine.is_shape_inference_io(name))
            refuse_host_tensors(name, shape_tensor=shape_tensor, on_host=on_host, model=model)
            datatype = datatype_of_trt(trt, engine.get_tensor_dtype(name))
            specs[name] = TensorSpec(name, datatype, tuple(engine.get_tensor_shape(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                low, opt, high = engine.get_tensor_profile_shape(name, self._profile)
                profiles[name] = ProfileShapes(name, tuple(low), tuple(opt), tuple(high))
        outputs = [name for name in names if name not in profiles]
        largest = largest_output_shapes(self._context, list(profiles.values()), outputs, model)
        capacity = {**largest, **{name: p.max for name, p in profiles.items()}}
        return [
            IoTensor(spec, _dtype(spec), profiles.get(name), capacity[name])
            for name, spec in specs.items()
        ]

    def _allocate(self, tensor: IoTensor) -> _Buffer:
        cuda, size = self._cuda, tensor.nbytes
        host_pointer = check(cuda.cudaMallocHost(size), "cudaMallocHost")
        self._frees.append(lambda: check(cuda.cudaFreeHost(host_pointer), "cudaFreeHost"))
        device_pointer = check(cuda.cudaMalloc(size), "cudaMalloc")
        self._frees.append(lambda: check(cuda.cudaFree(device_pointer), "cudaFree"))
        host = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(host_pointer))
        return _Buffer(tensor, host_pointer, device_pointer, host)

    def infer(self, batch: Tensors) -> Tensors:
        model = self.config.name
        # Every check before anything is queued: a bad input leaves no copy in flight.
        arrays = [(b, host_input(b.tensor, batch[b.tensor.spec.name])) for b in self._inputs]
        set_input_shapes(self._context, {b.tensor.spec.name: a.shape for b, a in arrays}, model)
        shapes = output_shapes_within(self._context, [b.tensor for b in self._outputs], model)
        try:
            self._enqueue(arrays, shapes)
        except BaseException:
            # Never return (and let the next call refill pinned buffers) with copies in flight.
            with contextlib.suppress(Exception):
                self._synchronize()
            raise
        self._synchronize()
        return {
            b.tensor.spec.name: self._read(b, shapes[b.tensor.spec.name]) for b in self._outputs
        }

    def _enqueue(self, arrays: list[tuple[_Buffer, np.ndarray]], shapes: dict[str, Any]) -> None:
        kind = self._cuda.cudaMemcpyKind
        for buffer, array in arrays:
            buffer.host[: array.nbytes] = array.reshape(-1).view(np.uint8)
            self._copy(buffer.device_pointer, buffer.host_pointer, array.nbytes,
                       kind.cudaMemcpyHostToDevice)  # fmt: skip
        require(self._context.execute_async_v3(self._stream), "execute_async_v3", self.config.name)
        for buffer in self._outputs:
            nbytes = int(np.prod(shapes[buffer.tensor.spec.name])) * buffer.tensor.dtype.itemsize
            self._copy(buffer.host_pointer, buffer.device_pointer, nbytes,
                       kind.cudaMemcpyDeviceToHost)  # fmt: skip

    def _copy(self, target: int, source: int, nbytes: int, kind: Any) -> None:
        check(self._cuda.cudaMemcpyAsync(target, source, nbytes, kind, self._stream),
              "cudaMemcpyAsync")  # fmt: skip

    def _synchronize(self) -> None:
        check(self._cuda.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    @staticmethod
    def _read(buffer: _Buffer, shape: tuple[int, ...]) -> np.ndarray:
        # A copy: the pinned buffer is reused by the next batch.
        nbytes = int(np.prod(shape)) * buffer.tensor.dtype.itemsize
        return buffer.host[:nbytes].view(buffer.tensor.dtype).reshape(shape).copy()

    def _drop_context(self) -> None:
        self._context = None  # TensorRT frees a context when its last reference goes

    def _release_plan(self, lease: Lease[tuple[Any, Any]]) -> None:
        self._engine = None
        lease.release()

    def close(self) -> None:
        """Free buffers, stream and context, then give back the plan's lease (the last
        instance out drops the engine and runtime, and with them their GPU memory)."""
        frees, self._frees = getattr(self, "_frees", []), []
        self._buffers, self._inputs, self._outputs = [], [], []
        errors = []
        for free in reversed(frees):
            try:
                free()
            except Exception as exc:  # free the rest; report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]


def _deserialize(trt: Any, plan: Path) -> tuple[Any, Any]:
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise ConfigError(f"{plan}: TensorRT could not load this plan")
    return runtime, engine


def _dtype(spec: TensorSpec) -> np.dtype[Any]:
    dtype = numpy_dtype(spec.datatype)
    assert dtype is not None  # TensorRT tensors are never BYTES
    return dtype
