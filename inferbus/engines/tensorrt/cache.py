"""Where built TensorRT plans live, under which key, and how builders share the cache safely.

A plan is only valid for the exact ONNX file (with any external weight files it references),
TensorRT version, GPU model and build settings it was built with, so the cache key hashes all
four. Builders on one machine may race (two
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
    #: identical optimization profiles, one per instance: TensorRT execution contexts in
    #: concurrent use on one engine must each use a profile of their own
    profiles: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError("TensorRT batch sizes need 1 <= min <= opt <= max")
        if self.profiles < 1:
            raise ConfigError("a TensorRT plan needs at least one optimization profile")
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


def external_data_files(onnx_path: Path) -> list[Path]:
    """The external-data files the ONNX model at ``onnx_path`` references (sorted, unique),
    resolved against its folder, as ONNX and TensorRT resolve them. Needs the ``onnx`` package
    (only the graph is read, never the weights)."""
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError(
            f"{onnx_path}: keying a TensorRT plan needs the onnx package (to find external "
            "weight files): pip install onnx"
        ) from exc
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [onnx_path.parent / location for location in sorted(locations)]


def model_sha256(onnx_path: Path) -> str:
    """The ONNX file's SHA-256 when its weights are inside it; else a SHA-256 over it and every
    external-data file it references (by location, in sorted order), so changed weights give
    a new cache key."""
    external = external_data_files(onnx_path)
    if not external:
        return file_sha256(onnx_path)
    material = {
        "onnx_sha256": file_sha256(onnx_path),
        "external": [
            [path.relative_to(onnx_path.parent).as_posix(), file_sha256(path)] for path in external
        ],
    }
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


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


def timing_cache_path(cache_dir: Path, target: Target) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every model built there: the
    kernel timings it holds are valid for any network on that target, which is what makes a
    second model's build (or a plan with one profile per instance) fast. Builders of
    different models may overwrite each other's additions (each write is atomic); the cache
    only saves time, so a lost entry costs a re-timing, never a wrong plan."""
    material = [target.tensorrt_version, target.gpu_name, list(target.compute_capability)]
    key = hashlib.sha256(orjson.dumps(material)).hexdigest()[:16]
    return cache_dir / f"timing-{key}.timing"


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


def current_umask() -> int:
    """This process's umask: from /proc on Linux (no change to process state), else by setting
    and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``. The file gets
    0o644 less the umask (what ``open(path, "w")`` gives under a 0o022 umask), not mkstemp's
    0o600, so workers running as another user can read a plan that root built."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o644 & ~current_umask())
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def settings_for(max_batch_size: int, options: Mapping[str, object], instances: int = 1
                 ) -> BuildSettings:  # fmt: skip
    """Build settings from a model config: max batch from ``max_batch_size``, one profile per
    instance, the rest from its ``[options]`` table (``opt_batch_size``, ``workspace_mib``,
    ``optimization_level``).
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
        profiles=instances,
    )
