"""Where built TensorRT plans live, under which key, and how builders share the cache safely.

A plan is only valid for the exact ONNX file, TensorRT version, GPU model and build settings
it was built with, so the cache key hashes all four. Builders on one machine may race (two
workers starting at once): a file lock serialises them and a plan appears only by atomic
rename, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from inferbus.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """What changes the plan a builder produces (and so the cache key)."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    workspace_mib: int = 1024
    optimization_level: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError("TensorRT batch sizes need 1 <= min <= opt <= max")
        if self.workspace_mib < 1 or not 0 <= self.optimization_level <= 5:
            raise ConfigError("workspace_mib must be >= 1 and optimization_level 0..5")


@dataclass(frozen=True, slots=True)
class Target:
    """The machine a plan is built for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(onnx_sha256: str, target: Target, settings: BuildSettings) -> str:
    """A stable key: the same inputs give the same key on any machine and Python version."""
    material = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": target.tensorrt_version,
        "gpu": target.gpu_name,
        "compute_capability": list(target.compute_capability),
        "settings": asdict(settings),
    }
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def plan_path(cache_dir: Path, model: str, key: str) -> Path:
    return cache_dir / f"{model}-{key}.plan"


@contextlib.contextmanager
def build_lock(plan: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``plan`` (blocking): one builder per plan at a time."""
    plan.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.with_suffix(".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def settings_for(max_batch_size: int, options: Mapping[str, object]) -> BuildSettings:
    """Build settings from a model config: max batch from ``max_batch_size``, the rest from
    its ``[options]`` table (``opt_batch_size``, ``workspace_mib``, ``optimization_level``).
    Precision is the ONNX file's: networks are strongly typed (export in FP16 for FP16)."""
    known = {"opt_batch_size", "workspace_mib", "optimization_level", "on_cache_miss"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown TensorRT options {unknown}; known: {sorted(known)}")
    opt = options.get("opt_batch_size", max_batch_size)
    workspace = options.get("workspace_mib", 1024)
    level = options.get("optimization_level", 3)
    if not (type(opt) is int and type(workspace) is int and type(level) is int):
        raise ConfigError("opt_batch_size, workspace_mib and optimization_level are integers")
    return BuildSettings(
        min_batch=1,
        opt_batch=opt,
        max_batch=max_batch_size,
        workspace_mib=workspace,
        optimization_level=level,
    )
