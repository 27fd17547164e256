"""The TensorRT engine's own logic, run on CPU machines: output sizing from the profile maxima,
refusal of data-dependent outputs, every check before anything is queued, a stream that is
synchronized when a call fails, and memory freed when loading fails half way.

TensorRT and CUDA cannot run here, so the engine is driven through stand-ins for the two
things it calls: a CUDA runtime whose "device" memory is host memory and whose copies are
``memmove``, and an execution context that infers output shapes and "runs" the network
(``y = concat(x, x)``, an output twice the batch) on those buffers. What only a GPU can tell
(TensorRT's real shape inference, kernels, streams) is checked by scripts/gpu_check.py.
"""

# The stand-ins spell their methods as the CUDA runtime does (cudaMalloc, ...).
# ruff: noqa: N802, N815

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import inferbus
from inferbus.contract import TensorSpec
from inferbus.engines.tensorrt.engine import TensorRTEngine
from inferbus.engines.tensorrt.io import (
    IoTensor,
    host_input,
    largest_output_shapes,
    output_shapes_within,
    refuse_host_tensors,
    require,
)
from inferbus.engines.tensorrt.profile import ProfileShapes, Shape
from tests.conftest import EXAMPLE_MODELS

MAX_BATCH = 8
X = ProfileShapes("x", (1, 4), (4, 4), (MAX_BATCH, 4))
FP32 = np.dtype(np.float32)
TO_DEVICE, TO_HOST = "h2d", "d2h"


class StandInCuda:
    """The CUDA runtime calls the engine makes, on host memory; counts what is live."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=TO_DEVICE,
                                     cudaMemcpyDeviceToHost=TO_HOST)  # fmt: skip

    def __init__(self, fail_allocation: int | None = None) -> None:
        self.live: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.allocations = 0
        self.fail_allocation = fail_allocation
        self.copies: list[tuple[str, int]] = []
        self.synchronized = 0

    def _allocate(self, size: int) -> tuple[int, int]:
        self.allocations += 1
        if self.allocations == self.fail_allocation:
            return (2, 0)  # cudaErrorMemoryAllocation
        memory = ctypes.create_string_buffer(size)
        self.live[ctypes.addressof(memory)] = memory
        return (0, ctypes.addressof(memory))

    def _free(self, pointer: int) -> tuple[int]:
        del self.live[pointer]
        return (0,)

    cudaMallocHost = cudaMalloc = _allocate
    cudaFreeHost = cudaFree = _free

    def cudaMemcpyAsync(self, target: int, source: int, nbytes: int, kind: str, stream: Any
                        ) -> tuple[int]:  # fmt: skip
        ctypes.memmove(target, source, nbytes)
        self.copies.append((kind, nbytes))
        return (0,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:
        self.synchronized += 1
        return (0,)


class StandInContext:
    """Shape inference and a "network" ``y = concat(x, x)`` (twice the batch's rows), on raw memory.
    ``data_dependent`` makes y's first dimension unknown, as a NonZero output's is."""

    def __init__(self, *, data_dependent: bool = False, execute_ok: bool = True) -> None:
        self.shapes: dict[str, Shape] = {}
        self.addresses: dict[str, int] = {}
        self.data_dependent = data_dependent
        self.execute_ok = execute_ok
        self.executed = 0

    def set_input_shape(self, name: str, shape: Shape) -> bool:
        if name != "x" or len(shape) != 2:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> Sequence[int]:
        if name == "x":
            return self.shapes["x"]
        rows = -1 if self.data_dependent else 2 * self.shapes["x"][0]
        return (rows, 4)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: Any) -> bool:
        self.executed += 1
        if not self.execute_ok:
            return False
        count = int(np.prod(self.shapes["x"]))
        x = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["x"]))
        y = np.ctypeslib.as_array((ctypes.c_float * (2 * count)).from_address(self.addresses["y"]))
        y[:] = np.concatenate([x, x])
        return True


def bare_engine(cuda: StandInCuda) -> TensorRTEngine:
    config = dataclasses.replace(
        inferbus.load_model_config(EXAMPLE_MODELS / "digits"), engine="tensorrt"
    )
    engine = TensorRTEngine(config)
    engine._frees, engine._cuda, engine._stream = [], cuda, object()
    return engine


def loaded_engine(cuda: StandInCuda, context: StandInContext) -> TensorRTEngine:
    """A TensorRTEngine wired as ``load`` wires it, with the stand-ins in TensorRT's place."""
    engine = bare_engine(cuda)
    engine._context = context
    largest = largest_output_shapes(context, [X], ["y"], "m")
    tensors = [IoTensor(TensorSpec("x", "FP32", (-1, 4)), FP32, X, X.max),
               IoTensor(TensorSpec("y", "FP32", (-1, 4)), FP32, None, largest["y"])]  # fmt: skip
    engine._buffers = [engine._allocate(tensor) for tensor in tensors]
    for buffer in engine._buffers:
        context.set_tensor_address(buffer.tensor.spec.name, buffer.device_pointer)
    engine._inputs, engine._outputs = engine._buffers[:1], engine._buffers[1:]
    return engine


def test_outputs_are_sized_from_what_the_context_infers_at_the_profile_max() -> None:
    """y has twice the batch's rows: sizing free dimensions as max_batch_size (what the engine
    did) would give 8 rows and let a batch of 8 write 16."""
    shapes = largest_output_shapes(StandInContext(), [X], ["y"], "m")
    assert shapes == {"y": (2 * MAX_BATCH, 4)}


def test_data_dependent_outputs_are_refused_at_load() -> None:
    with pytest.raises(inferbus.ConfigError, match=r"outputs \['y'\] have data-dependent shapes"):
        largest_output_shapes(StandInContext(data_dependent=True), [X], ["y"], "m")


def test_a_refused_setter_is_an_error_not_ignored() -> None:
    bad = ProfileShapes("x", (1,), (1,), (2,))  # the stand-in, as TensorRT, refuses rank 1
    with pytest.raises(inferbus.EngineFailure, match=r"refused input shape x=\[2\]"):
        largest_output_shapes(StandInContext(), [bad], ["y"], "m")
    for refused in (False, None):
        with pytest.raises(inferbus.EngineFailure, match="refused the address of x"):
            require(refused, "the address of x")
    require(True, "anything")


def test_an_output_beyond_its_buffer_fails_before_anything_runs() -> None:
    context = StandInContext()
    context.set_input_shape("x", (MAX_BATCH, 4))
    small = IoTensor(TensorSpec("y", "FP32", (-1, 4)), FP32, None, (MAX_BATCH, 4))
    with pytest.raises(inferbus.EngineFailure, match=r"would have shape \[16, 4\], beyond"):
        output_shapes_within(context, [small], "m")
    fits = dataclasses.replace(small, capacity=(2 * MAX_BATCH, 4))
    assert output_shapes_within(context, [fits], "m") == {"y": (16, 4)}


def test_a_0d_input_keeps_its_shape() -> None:
    scalar = IoTensor(TensorSpec("t", "FP32", ()), FP32, ProfileShapes("t", (), (), ()), ())
    array = host_input(scalar, np.float32(0.5))
    assert array.shape == ()
    assert array.dtype == FP32
    assert scalar.nbytes == 4
    with pytest.raises(inferbus.BadInput, match="outside the engine's profile"):
        host_input(scalar, np.zeros((1,), np.float32))


REFUSED = [(True, False, "a shape tensor"), (False, True, "in host memory")]


@pytest.mark.parametrize(("shape_tensor", "on_host", "kind"), REFUSED)
def test_shape_and_host_tensors_are_refused(shape_tensor: bool, on_host: bool, kind: str) -> None:
    with pytest.raises(inferbus.ConfigError, match=kind):
        refuse_host_tensors("n", shape_tensor=shape_tensor, on_host=on_host, model="m")
    refuse_host_tensors("n", shape_tensor=False, on_host=False, model="m")


def test_a_call_runs_and_reads_outputs_of_the_shape_it_had() -> None:
    cuda, context = StandInCuda(), StandInContext()
    engine = loaded_engine(cuda, context)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = engine.infer({"x": x})["y"]
    np.testing.assert_array_equal(y, np.concatenate([x, x]))
    assert cuda.copies == [(TO_DEVICE, 48), (TO_HOST, 96)]
    assert cuda.synchronized == 1
    full = np.ones((MAX_BATCH, 4), np.float32)  # the largest batch: y fills its whole buffer
    np.testing.assert_array_equal(engine.infer({"x": full})["y"], np.ones((16, 4), np.float32))


def test_a_bad_input_queues_no_copy() -> None:
    cuda, context = StandInCuda(), StandInContext()
    engine = loaded_engine(cuda, context)
    with pytest.raises(inferbus.BadInput, match="outside the engine's profile"):
        engine.infer({"x": np.zeros((MAX_BATCH + 1, 4), np.float32)})
    assert cuda.copies == []
    assert context.executed == 0


def test_a_failed_launch_synchronizes_before_the_next_call_may_refill_buffers() -> None:
    cuda, context = StandInCuda(), StandInContext(execute_ok=False)
    engine = loaded_engine(cuda, context)
    with pytest.raises(inferbus.EngineFailure, match="refused execute_async_v3"):
        engine.infer({"x": np.zeros((2, 4), np.float32)})
    assert cuda.copies == [(TO_DEVICE, 32)]  # the input's copy was in flight ...
    assert cuda.synchronized == 1  # ... and the stream was drained before the error surfaced


def allocate_all(engine: TensorRTEngine, tensors: list[IoTensor]) -> None:
    for tensor in tensors:
        engine._allocate(tensor)


@pytest.mark.parametrize("failing", [1, 2, 3, 4])
def test_memory_taken_before_a_failed_allocation_is_freed_by_close(failing: int) -> None:
    """What ``load`` does when a step fails: close(), which must free what was taken so far."""
    cuda = StandInCuda(fail_allocation=failing)
    engine = bare_engine(cuda)
    tensors = [IoTensor(TensorSpec(f"t{i}", "FP32", (4,)), FP32, None, (4,)) for i in range(2)]
    with pytest.raises(inferbus.EngineFailure, match=r"cudaMalloc.* failed: CUDA error 2"):
        allocate_all(engine, tensors)
    assert len(cuda.live) == failing - 1
    engine.close()
    assert cuda.live == {}


def test_close_frees_every_buffer_and_can_run_twice() -> None:
    cuda = StandInCuda()
    engine = loaded_engine(cuda, StandInContext())
    assert len(cuda.live) == 4  # pinned + device for x and y
    engine.close()
    engine.close()
    assert cuda.live == {}
