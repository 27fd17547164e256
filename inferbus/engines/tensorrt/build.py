"""Building TensorRT plans from ONNX files, and finding them in the cache.

Written for the TensorRT 10.12+ / 11 Python API only: strongly typed networks (precision comes
from the ONNX file's types), optimization profiles, serialized timing caches. Needs the
``tensorrt`` package and an NVIDIA GPU, so it runs on GPU nodes only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from inferbus.contract import TensorSpec
from inferbus.engines.tensorrt.cache import (
    BuildSettings,
    Target,
    build_lock,
    cache_key,
    model_sha256,
    plan_path,
    settings_for,
    timing_cache_path,
    write_atomically,
)
from inferbus.engines.tensorrt.cuda import check, cudart
from inferbus.engines.tensorrt.profile import profile_for
from inferbus.engines.tensorrt.types import datatype_of_trt
from inferbus.errors import ConfigError
from inferbus.repository import ModelConfig


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise ConfigError(
            "the tensorrt engine needs TensorRT 10.12+ on an NVIDIA GPU: "
            "pip install 'inferbus[tensorrt]'"
        ) from exc
    return tensorrt


def current_target(trt: Any) -> Target:
    properties = check(cudart().cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = properties.name.decode() if isinstance(properties.name, bytes) else str(properties.name)
    return Target(trt.__version__, name.strip("\x00 "), (properties.major, properties.minor))


def cache_dir(config: ModelConfig) -> Path:
    folder = config.options.get("cache_dir", ".plans")
    return config.directory / str(folder)


def ensure_plan(config: ModelConfig, *, build: bool, log: Any = print) -> Path:
    """The cached plan file for this model on this GPU; built (under the lock) when missing
    and ``build`` is true, else a ConfigError that says how to build it."""
    trt = import_tensorrt()
    options = {k: v for k, v in config.options.items() if k != "cache_dir"}
    settings = settings_for(config.max_batch_size, options, config.instances)
    target = current_target(trt)
    key = cache_key(model_sha256(config.path), target, settings)
    plan = plan_path(cache_dir(config), config.name, key)
    if plan.exists():
        return plan
    if not build:
        raise ConfigError(
            f"{config.name}: no TensorRT plan for this GPU in {plan.parent}; "
            f"run `inferbus build {config.directory}` first"
        )
    with build_lock(plan):
        if plan.exists():  # another builder finished while we waited for the lock
            return plan
        log(f"{config.name}: building a TensorRT plan (this takes a while) ...")
        started = time.monotonic()
        data = build_plan(trt, config.path, settings, timing_cache_path(plan.parent, target))
        write_atomically(plan, data)
        log(f"{config.name}: plan built in {time.monotonic() - started:.0f}s: {plan}")
    return plan


def build_plan(trt: Any, onnx: Path, settings: BuildSettings, timing_cache: Path) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # IParser.parse_from_file(path), not parse(bytes): given only bytes the parser has no folder
    # to resolve external weight files (``external_data`` locations) against.
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"{onnx}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    for _ in range(settings.profiles):  # identical; the timing cache makes the copies cheap
        profile = builder.create_optimization_profile()
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            spec = TensorSpec(tensor.name, datatype_of_trt(trt, tensor.dtype), tuple(tensor.shape))
            shapes = profile_for(spec, settings)
            profile.set_shape(tensor.name, shapes.min, shapes.opt, shapes.max)
        if config.add_optimization_profile(profile) < 0:
            raise ConfigError(f"{onnx}: TensorRT refused its optimization profile (log above)")
    previous = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(previous)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ConfigError(f"{timing_cache}: TensorRT refused this timing cache; delete it")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(f"{onnx}: TensorRT could not build a plan (see its log above)")
    write_atomically(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))
