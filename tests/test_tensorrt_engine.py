"""The TensorRT engine itself: needs TensorRT and an NVIDIA GPU, so it is skipped elsewhere.

On the project's CPU machines these tests skip and say so; scripts/gpu_check.py runs the same
comparison on GPU nodes that have TensorRT.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

import inferbus
from inferbus.engines import create_engine
from tests.conftest import EXAMPLE_MODELS

tensorrt = pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed here (CPU machine); gpu_check.py covers it"
)
pytestmark = pytest.mark.tensorrt


def test_plan_is_built_cached_and_matches_onnxruntime(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_MODELS / "digits", tmp_path / "digits")
    config = inferbus.load_model_config(tmp_path / "digits")
    reference = create_engine(config)
    reference.load()
    engine = create_engine(dataclasses.replace(config, engine="tensorrt"))
    engine.load()
    assert list((tmp_path / "digits" / ".plans").glob("*.plan"))
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    got, want = engine({"pixels": x})["logits"], reference({"pixels": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    with pytest.raises(inferbus.BadInput, match="outside the engine's profile"):
        engine({"pixels": np.zeros((65, 64), dtype=np.float32)})
    engine.close()


def test_a_worker_told_to_refuse_does_not_build(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_MODELS / "digits", tmp_path / "digits")
    config = inferbus.load_model_config(tmp_path / "digits")
    refusing = dataclasses.replace(config, engine="tensorrt", options={"on_cache_miss": "refuse"})
    with pytest.raises(inferbus.ConfigError, match="inferbus build"):
        create_engine(refusing).load()
