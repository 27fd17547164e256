"""One copy of a model's weights per process, leased by its instances; what a failed load
gives back; streams no two instances share; TensorRT plans with a profile per instance and a
timing cache per GPU. All of it runs on CPU machines (torch on the CPU, stand-ins for CUDA
streams); the TensorRT side of sharing is checked on GPU machines by scripts/gpu_check.py."""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace
from typing import Any

import pytest

import inferbus
from inferbus.contract import Signature, Tensors, TensorSpec
from inferbus.engines import Engine, TorchEngine
from inferbus.engines.shared import SharedLoads
from inferbus.engines.tensorrt.cache import (
    BuildSettings,
    Target,
    cache_key,
    settings_for,
    timing_cache_path,
)
from tests.conftest import EXAMPLE_MODELS, ROOT

H100 = Target("10.13.0", "NVIDIA H100 80GB HBM3", (9, 0))


def test_leases_share_one_load_and_the_last_release_drops_it() -> None:
    loads: list[object] = []

    def load() -> object:
        loads.append(object())
        return loads[-1]

    shared: SharedLoads[object] = SharedLoads()
    first, second = (shared.acquire("plan", load, slots=2) for _ in range(2))
    assert len(loads) == 1
    assert first.value is second.value
    assert (first.slot, second.slot) == (0, 1)  # one optimization profile each
    assert first.release() is False
    assert first.release() is False  # a second release of one lease changes nothing
    assert shared.copies("plan") == [1]
    third = shared.acquire("plan", load, slots=2)
    assert third.slot == 0  # the lowest free slot
    assert len(loads) == 1
    assert second.release() is False
    assert third.release() is True
    assert shared.copies("plan") == []
    assert shared.acquire("plan", load, slots=2).value is loads[1]  # loaded afresh


def test_a_full_copy_makes_the_next_lease_load_another() -> None:
    """A new version of the same file loading while the old one drains still loads."""
    shared: SharedLoads[int] = SharedLoads()
    count = iter(range(10))
    leases = [shared.acquire("plan", lambda: next(count), slots=2) for _ in range(3)]
    assert [(lease.value, lease.slot) for lease in leases] == [(0, 0), (0, 1), (1, 0)]
    assert shared.copies("plan") == [2, 1]


def test_a_failed_load_leaves_nothing_behind() -> None:
    shared: SharedLoads[int] = SharedLoads()

    def broken() -> int:
        raise inferbus.ConfigError("no such plan")

    with pytest.raises(inferbus.ConfigError, match="no such plan"):
        shared.acquire("plan", broken)
    assert shared.copies("plan") == []
    assert shared.acquire("plan", lambda: 7).value == 7


def test_leases_from_many_threads_get_distinct_slots_and_one_load() -> None:
    shared: SharedLoads[str] = SharedLoads()
    loads: list[int] = []
    slots: list[int] = []
    start = threading.Barrier(8)

    def load() -> str:
        loads.append(1)
        return "module"

    def lease() -> None:
        start.wait()
        slots.append(shared.acquire("m", load, slots=8).slot)

    threads = [threading.Thread(target=lease) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(slots) == list(range(8))
    assert loads == [1]


def test_torch_instances_share_one_module() -> None:
    pytest.importorskip("torch")
    config = dataclasses.replace(
        inferbus.load_model_config(ROOT / "tests" / "models_torch" / "affine"), instances=2
    )
    first, second = TorchEngine(config), TorchEngine(config)
    first.load()
    second.load()
    try:
        assert first._module is second._module
    finally:
        first.close()
    assert second._module is not None  # still served by the other instance
    second.close()
    third = TorchEngine(config)
    third.load()
    third.close()


def test_torch_instances_never_share_a_pooled_stream() -> None:
    """torch.cuda.Stream() round-robins a pool of 32: a stand-in pool, with one slot already
    taken by other code, still gives each instance a stream of its own."""
    from inferbus.engines import torch as torch_engine

    handles = iter(list(range(32)) * 3)
    stand_in = SimpleNamespace(
        cuda=SimpleNamespace(Stream=lambda: SimpleNamespace(cuda_stream=next(handles)))
    )
    taken = [torch_engine.own_stream(stand_in) for _ in range(32)]
    assert sorted(stream.cuda_stream for stream in taken) == list(range(32))
    with pytest.raises(inferbus.ConfigError, match="32 pooled CUDA streams"):
        torch_engine.own_stream(stand_in)
    torch_engine._streams_held.clear()


EVENTS: list[str] = []


class ThirdFails(Engine):
    """Records load and close; the third instance of a model fails to load."""

    backend = "recorder"

    def __init__(self, config: inferbus.ModelConfig) -> None:
        super().__init__(config)
        self.name = "abcd"[sum(event.startswith("create") for event in EVENTS)]
        EVENTS.append(f"create {self.name}")

    def load(self) -> None:
        if self.name == "c":
            raise inferbus.ConfigError("c cannot load")
        EVENTS.append(f"load {self.name}")
        self.signature = Signature((TensorSpec("x", "FP32", (-1, 1)),),
                                   (TensorSpec("x", "FP32", (-1, 1)),))  # fmt: skip

    def infer(self, batch: Tensors) -> Tensors:
        return dict(batch)

    def close(self) -> None:
        EVENTS.append(f"close {self.name}")


async def test_a_failed_instance_closes_those_loaded_before_it() -> None:
    """What a worker's instances hold (GPU memory) goes back when a later one fails to load;
    it fails before connecting, so no server is needed."""
    config = dataclasses.replace(
        inferbus.load_model_config(EXAMPLE_MODELS / "digits"),
        engine_class=f"{__name__}:ThirdFails", instances=4, execution="thread",
    )  # fmt: skip
    EVENTS.clear()
    with pytest.raises(inferbus.ConfigError, match="c cannot load"):
        async with inferbus.Worker([config], inferbus.ConnectOptions(servers=["nats://0:1"])):
            pass
    loads_and_closes = [event for event in EVENTS if not event.startswith("create")]
    assert loads_and_closes == ["load a", "load b", "close a", "close b", "close c"]


def test_plans_hold_a_profile_per_instance_and_timings_are_kept_per_gpu(tmp_path: Any) -> None:
    one, two = settings_for(32, {}, 1), settings_for(32, {}, 2)
    assert (one.profiles, two.profiles) == (1, 2)
    assert cache_key("a" * 64, H100, one) != cache_key("a" * 64, H100, two)
    with pytest.raises(inferbus.ConfigError, match="at least one optimization profile"):
        BuildSettings(profiles=0)
    other_gpu = dataclasses.replace(H100, gpu_name="NVIDIA H200")
    timing = timing_cache_path(tmp_path, H100)
    assert timing == timing_cache_path(tmp_path, H100)  # every model built on this GPU
    assert timing != timing_cache_path(tmp_path, other_gpu)
    assert timing.suffix == ".timing"
