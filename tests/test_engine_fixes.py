"""Desk-check fixes: plan file modes, cache keys over external ONNX weights, and gpu_check's
batching and torch row. None of this needs TensorRT or a GPU."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inferbus.contract import Tensors
from inferbus.engines import TorchEngine
from inferbus.engines.tensorrt.cache import (
    BuildSettings,
    Target,
    cache_key,
    external_data_files,
    file_sha256,
    model_sha256,
    write_atomically,
)

H100 = Target("10.13.0", "NVIDIA H100 80GB HBM3", (9, 0))


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
@pytest.mark.parametrize("name", ["digits-abc.plan", "digits-abc.timing"])
def test_written_plans_get_0o644_less_the_umask(tmp_path: Path, mask: int, name: str) -> None:
    os.umask(mask)
    write_atomically(tmp_path / name, b"plan")
    with open(tmp_path / "reference", "w") as handle:
        handle.write("x")
    mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
    assert mode == 0o644 & ~mask
    # what open() gives, except that plans are never made group- or world-writable
    assert mode == stat.S_IMODE((tmp_path / "reference").stat().st_mode) & ~0o022
    assert (tmp_path / name).read_bytes() == b"plan"


def external_model(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    weights = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), name="W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
        [weights],
    )
    model = helper.make_model(graph)
    convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_the_key_hashes_external_weight_files(tmp_path: Path) -> None:
    onnx_path = external_model(tmp_path)
    weights = tmp_path / "weights.bin"
    assert external_data_files(onnx_path) == [weights]
    settings = BuildSettings(max_batch=8, opt_batch=8)
    before = cache_key(model_sha256(onnx_path), H100, settings)
    assert before == cache_key(model_sha256(onnx_path), H100, settings)
    model_bytes = onnx_path.read_bytes()
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert onnx_path.read_bytes() == model_bytes
    assert cache_key(model_sha256(onnx_path), H100, settings) != before


def test_a_self_contained_model_keeps_its_file_hash() -> None:
    onnx_path = Path(__file__).resolve().parents[1] / "examples/models/digits/model.onnx"
    assert external_data_files(onnx_path) == []
    assert model_sha256(onnx_path) == file_sha256(onnx_path)


@pytest.mark.parametrize(("rows", "max_batch"), [(360, 64), (64, 64), (1, 64), (7, 3), (0, 4)])
def test_gpu_check_batches_never_exceed_the_max(rows: int, max_batch: int) -> None:
    from scripts.gpu_check import batch_slices, run_in_batches

    parts = batch_slices(rows, max_batch)
    assert all(0 < part.stop - part.start <= max_batch for part in parts)
    assert [i for part in parts for i in range(rows)[part]] == list(range(rows))
    seen: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        assert 1 <= len(x) <= max_batch
        seen.append(len(x))
        return x * 2

    if rows:
        x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        np.testing.assert_array_equal(run_in_batches(run, x, max_batch), x * 2)
        assert sum(seen) == rows


def test_gpu_check_torch_row_runs_through_a_torch_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from scripts import gpu_check

    calls: list[int] = []
    infer = TorchEngine.infer

    def counting(self: TorchEngine, batch: Tensors) -> Tensors:
        calls.append(len(batch["pixels"]))
        return infer(self, batch)

    monkeypatch.setattr(TorchEngine, "infer", counting)
    engine = gpu_check.torch_engine()
    assert isinstance(engine, TorchEngine)
    assert engine.device == "cpu"
    x = gpu_check.held_out()
    outputs = gpu_check.run_in_batches(gpu_check.torch_run(), x, 64)
    reference = gpu_check.onnxruntime_run(["CPUExecutionProvider"])(x)
    assert calls
    assert max(calls) <= 64
    assert sum(calls) == len(x)
    np.testing.assert_allclose(outputs, reference, rtol=1e-4, atol=1e-4)


def test_an_exported_program_moves_with_the_devices_in_its_graph() -> None:
    """A ``.pt2`` whose graph creates a tensor on the CPU: moved by the pass, that node follows
    the program to the new device ("meta" here, which every machine has)."""
    import torch

    from inferbus.engines.torch import exported_on

    class AddOnes(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.ones(x.shape, device="cpu")

    program = torch.export.export(AddOnes(), (torch.zeros(2, 3),))
    devices = [
        node.kwargs["device"]
        for node in exported_on(torch, program, "meta").graph.nodes
        if "device" in node.kwargs
    ]
    assert devices
    assert all(torch.device(device).type == "meta" for device in devices)
