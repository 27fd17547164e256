"""The TensorRT engine: a cached plan, one execution context and CUDA stream per instance,
pinned host and device buffers allocated once for the profile's largest shapes.

TensorRT 10.12+ / 11 API only (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). Runs on NVIDIA GPU nodes only; on this project's CPU machines only its
cache, profile and shape checks are tested, and GPU machines check it with
scripts/gpu_check.py when TensorRT is installed there.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferbus.codecs import numpy_dtype
from inferbus.contract import Signature, Tensors, TensorSpec
from inferbus.engines.base import Engine
from inferbus.engines.tensorrt.build import ensure_plan, import_tensorrt
from inferbus.engines.tensorrt.cuda import check, cudart
from inferbus.engines.tensorrt.profile import ProfileShapes
from inferbus.engines.tensorrt.types import datatype_of_trt
from inferbus.errors import ConfigError, EngineFailure


@dataclass(slots=True)
class _Buffer:
    """One I/O tensor's memory: pinned host (as a numpy view) and device, sized for the max."""

    spec: TensorSpec
    dtype: np.dtype[Any]
    host_pointer: int
    device_pointer: int
    host: np.ndarray  # uint8 view over the pinned host memory
    profile: ProfileShapes | None  # inputs only


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def load(self) -> None:
        trt = import_tensorrt()
        self._cuda = cudart()
        build = self.config.options.get("on_cache_miss", "build") != "refuse"
        plan = ensure_plan(self.config, build=build)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ConfigError(f"{self.config.name}: TensorRT could not load the cached plan")
        self._context = self._engine.create_execution_context()
        self._stream = check(self._cuda.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers = [self._allocate(trt, index) for index in range(self._engine.num_io_tensors)]
        inputs = tuple(b.spec for b in self._buffers if b.profile is not None)
        outputs = tuple(b.spec for b in self._buffers if b.profile is None)
        self.signature = Signature(inputs, outputs)
        self.device = "cuda"

    def _allocate(self, trt: Any, index: int) -> _Buffer:
        engine = self._engine
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        datatype = datatype_of_trt(trt, engine.get_tensor_dtype(name))
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        profile = None
        if is_input:
            low, opt, high = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
            profile = ProfileShapes(name, low, opt, high)
            largest = high
        else:  # free output dimensions follow the batch: size them for the largest batch
            largest = tuple(self.config.max_batch_size if d == -1 else d for d in shape)
        dtype = numpy_dtype(datatype)
        assert dtype is not None  # TensorRT tensors are never BYTES
        size = max(math.prod(largest) * dtype.itemsize, 1)
        host_pointer = check(self._cuda.cudaMallocHost(size), "cudaMallocHost")
        device_pointer = check(self._cuda.cudaMalloc(size), "cudaMalloc")
        host = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(host_pointer))
        return _Buffer(TensorSpec(name, datatype, shape), dtype, host_pointer, device_pointer,
                       host, profile)  # fmt: skip

    def infer(self, batch: Tensors) -> Tensors:
        copy = self._cuda.cudaMemcpyKind
        for buffer in self._buffers:
            if buffer.profile is not None:
                array = np.ascontiguousarray(batch[buffer.spec.name], dtype=buffer.dtype)
                buffer.profile.check(array.shape)  # a 400 here, not a CUDA error later
                buffer.host[: array.nbytes] = array.reshape(-1).view(np.uint8)
                self._copy(buffer.device_pointer, buffer.host_pointer, array.nbytes,
                           copy.cudaMemcpyHostToDevice)  # fmt: skip
                self._context.set_input_shape(buffer.spec.name, array.shape)
            self._context.set_tensor_address(buffer.spec.name, buffer.device_pointer)
        if not self._context.execute_async_v3(self._stream):
            raise EngineFailure("TensorRT execute_async_v3 failed", model=self.config.name)
        pending: list[tuple[_Buffer, tuple[int, ...], int]] = []
        for buffer in self._buffers:
            if buffer.profile is None:
                shape = tuple(self._context.get_tensor_shape(buffer.spec.name))
                nbytes = math.prod(shape) * buffer.dtype.itemsize
                if min(shape, default=0) < 0 or nbytes > buffer.host.nbytes:
                    # Never copy past the allocation: a data-dependent or unforeseen shape.
                    raise EngineFailure(
                        f"output {buffer.spec.name!r} has shape {list(shape)}, beyond the "
                        f"{buffer.host.nbytes} bytes allocated for it",
                        model=self.config.name,
                    )
                self._copy(buffer.host_pointer, buffer.device_pointer, nbytes,
                           copy.cudaMemcpyDeviceToHost)  # fmt: skip
                pending.append((buffer, shape, nbytes))
        check(self._cuda.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {buffer.spec.name: self._read(buffer, shape, n) for buffer, shape, n in pending}

    def _copy(self, target: int, source: int, nbytes: int, kind: Any) -> None:
        check(self._cuda.cudaMemcpyAsync(target, source, nbytes, kind, self._stream),
              "cudaMemcpyAsync")  # fmt: skip

    @staticmethod
    def _read(buffer: _Buffer, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
        # A copy: the pinned buffer is reused by the next batch.
        return buffer.host[:nbytes].view(buffer.dtype).reshape(shape).copy()

    def close(self) -> None:
        for buffer in getattr(self, "_buffers", []):
            check(self._cuda.cudaFree(buffer.device_pointer), "cudaFree")
            check(self._cuda.cudaFreeHost(buffer.host_pointer), "cudaFreeHost")
        self._buffers = []
        if getattr(self, "_stream", None) is not None:
            check(self._cuda.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
