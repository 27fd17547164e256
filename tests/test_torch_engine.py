"""The PyTorch engine on the CPU: in-process, and end to end through a worker over NATS.

CUDA streams and pinned memory only run on GPU machines (scripts/gpu_check.py checks them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import inferbus
from inferbus.engines import TorchEngine, create_engine
from tests.conftest import ROOT, worker_options

TORCH_MODELS = ROOT / "tests" / "models_torch"


def affine() -> inferbus.ModelConfig:
    return inferbus.load_model_config(TORCH_MODELS / "affine")


def test_engine_in_process() -> None:
    engine = create_engine(affine())
    assert isinstance(engine, TorchEngine)
    engine.load()
    assert engine.device == "cpu"
    assert [s.name for s in engine.signature.outputs] == ["y", "s"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    outputs = engine({"x": x})
    np.testing.assert_allclose(outputs["y"], 2 * x + 1)
    np.testing.assert_allclose(outputs["s"], x.sum(axis=1))


async def test_served_by_a_worker(nats_server: inferbus.EmbeddedServer) -> None:
    async with (
        inferbus.Worker([affine()], worker_options(nats_server)),
        inferbus.connect(nats_server.url) as client,
    ):
        x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        result = await client.infer("affine", x)
        np.testing.assert_allclose(result["y"], 2 * x + 1, rtol=1e-6)
        np.testing.assert_allclose(result["s"], x.sum(axis=1), rtol=1e-5)
        (info,) = await client.models()
        assert (info.engine, info.devices) == ("torch", ("cpu",))
        with pytest.raises(inferbus.BadInput, match="must have shape"):
            await client.infer("affine", np.zeros((2, 5), dtype=np.float32))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": ()}, "declare `inputs` and `outputs`"),
        ({"inputs": ({"name": "x", "datatype": "FP32"},)}, "name, datatype and shape"),
        ({"outputs": ({"name": "t", "datatype": "BYTES", "shape": [-1]},)}, "cannot hold BYTES"),
    ],
)
def test_config_must_declare_a_usable_signature(change: dict[str, object], message: str) -> None:
    engine = create_engine(dataclasses.replace(affine(), **change))  # type: ignore[arg-type]
    with pytest.raises(inferbus.ConfigError, match=message):
        engine.load()


def test_a_file_torch_cannot_load(tmp_path: Path) -> None:
    (tmp_path / "model.pt2").write_bytes(b"not a program")
    config = dataclasses.replace(affine(), directory=tmp_path)
    with pytest.raises(inferbus.ConfigError, match="torch cannot load it"):
        create_engine(config).load()


def test_uint8_images_are_normalised_on_the_device() -> None:
    """The example engine: uint8 NHWC on the wire, normalised float NCHW for the network."""
    config = inferbus.load_model_config(ROOT / "examples" / "gpu" / "image_means")
    engine = create_engine(config)
    engine.load()
    assert engine.signature.inputs[0].datatype == "UINT8"
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    means = engine({"image": images})["channel_means"]
    expected = ((images / 255.0 - 0.5) / 0.25).mean(axis=(1, 2))
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-5)
