"""TensorRT plan cache keys, the builders' lock and atomic writes, and profile shapes.

None of this needs TensorRT or a GPU; the engine that uses it is checked on GPU machines.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

import inferbus
from inferbus.contract import TensorSpec
from inferbus.engines.tensorrt.cache import (
    BuildSettings,
    Target,
    build_lock,
    cache_key,
    file_sha256,
    plan_path,
    settings_for,
    write_atomically,
)
from inferbus.engines.tensorrt.profile import profile_for

H100 = Target("10.13.0", "NVIDIA H100 80GB HBM3", (9, 0))


def test_the_key_changes_with_each_input_and_only_with_them() -> None:
    settings = BuildSettings(max_batch=32, opt_batch=8)
    key = cache_key("a" * 64, H100, settings)
    assert key == cache_key("a" * 64, H100, BuildSettings(max_batch=32, opt_batch=8))
    variants = [
        cache_key("b" * 64, H100, settings),
        cache_key("a" * 64, Target("11.0.0", H100.gpu_name, (9, 0)), settings),
        cache_key("a" * 64, Target("10.13.0", "NVIDIA H200", (9, 0)), settings),
        cache_key("a" * 64, Target("10.13.0", H100.gpu_name, (8, 9)), settings),
        cache_key("a" * 64, H100, BuildSettings(max_batch=32, opt_batch=8, workspace_mib=2048)),
        cache_key("a" * 64, H100, BuildSettings(max_batch=64, opt_batch=8)),
    ]
    assert len({key, *variants}) == 7


def test_plan_path_and_file_hash(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not really onnx")
    assert file_sha256(onnx) == __import__("hashlib").sha256(b"not really onnx").hexdigest()
    assert len(file_sha256(onnx)) == 64
    assert plan_path(tmp_path, "digits", "k" * 32).name == f"digits-{'k' * 32}.plan"


def _note(log: str, event: str) -> None:
    with Path(log).open("a") as handle:
        handle.write(f"{time.monotonic():.3f} {event}\n")


def _hold_lock(plan: str, log: str, both_started: Barrier) -> None:
    both_started.wait(30)  # both go for the lock at once, whichever process started first
    with build_lock(Path(plan)):
        _note(log, "in")
        time.sleep(0.3)  # meanwhile the other one is at the lock: it must wait
        _note(log, "out")


def test_builders_in_two_processes_take_turns(tmp_path: Path) -> None:
    plan, log = tmp_path / "m.plan", tmp_path / "log.txt"
    context = multiprocessing.get_context("spawn")
    both_started = context.Barrier(2)
    args = (str(plan), str(log), both_started)
    workers = [context.Process(target=_hold_lock, args=args) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [worker.exitcode for worker in workers] == [0, 0]
    events = [line.split()[1] for line in log.read_text().splitlines()]
    assert events == ["in", "out", "in", "out"]  # never two inside at once


def test_write_atomically_replaces_whole_files_and_leaves_no_litter(tmp_path: Path) -> None:
    plan = tmp_path / "m.plan"
    write_atomically(plan, b"first")
    write_atomically(plan, b"second plan")
    assert plan.read_bytes() == b"second plan"
    assert [p.name for p in tmp_path.iterdir()] == ["m.plan"]


def test_settings_come_from_the_config() -> None:
    settings = settings_for(64, {"opt_batch_size": 16, "workspace_mib": 512})
    assert (settings.min_batch, settings.opt_batch, settings.max_batch) == (1, 16, 64)
    assert settings.workspace_mib == 512
    with pytest.raises(inferbus.ConfigError, match="unknown TensorRT options"):
        settings_for(64, {"fp16": True})  # precision comes from the ONNX file
    with pytest.raises(inferbus.ConfigError, match="min <= opt <= max"):
        settings_for(8, {"opt_batch_size": 16})
    with pytest.raises(inferbus.ConfigError, match="integers"):
        settings_for(8, {"workspace_mib": "lots"})


def test_profile_shapes_from_the_signature() -> None:
    settings = BuildSettings(min_batch=1, opt_batch=8, max_batch=32)
    profile = profile_for(TensorSpec("pixels", "FP32", (-1, 3, 224, 224)), settings)
    assert (profile.min, profile.opt, profile.max) == ((1, 3, 224, 224), (8, 3, 224, 224),
                                                       (32, 3, 224, 224))  # fmt: skip
    profile.check((4, 3, 224, 224))
    for bad in [(33, 3, 224, 224), (0, 3, 224, 224), (4, 3, 224, 225), (4, 3, 224)]:
        with pytest.raises(inferbus.BadInput, match="outside the engine's profile"):
            profile.check(bad)
    fixed = profile_for(TensorSpec("k", "INT64", (2, 2)), settings)
    assert fixed.min == fixed.max == (2, 2)
    with pytest.raises(inferbus.ConfigError, match="free dimensions beyond the batch"):
        profile_for(TensorSpec("text", "INT64", (-1, -1)), settings)


def test_without_tensorrt_the_engine_says_what_to_install() -> None:
    """On machines without TensorRT (this one), a tensorrt model fails to load clearly."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the GPU check exercises the engine instead")
    from inferbus.engines import create_engine
    from tests.conftest import EXAMPLE_MODELS

    config = dataclasses.replace(
        inferbus.load_model_config(EXAMPLE_MODELS / "digits"), engine="tensorrt"
    )
    with pytest.raises(inferbus.ConfigError, match=r"pip install 'inferbus\[tensorrt\]'"):
        create_engine(config).load()
