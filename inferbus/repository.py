"""Model repositories: ``<repo>/<folder>/config.toml`` plus the model file(s).

A config names the engine, version, batch limits and instance count, and optionally an
``engine_class`` (``"file.py:Class"`` in the model folder, or ``"package.module:Class"``) that
subclasses the engine to add node-side pre/post-processing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from inferbus.contract import NAME_PATTERN
from inferbus.errors import ConfigError

CONFIG_FILE: Final = "config.toml"
DEFAULT_MAX_REQUEST_BYTES: Final = 512 * 1024 * 1024
# auto: on the event loop when the engine is faster than a hop to a thread, else on a thread.
EXECUTION_MODES: Final = ("auto", "thread", "inline")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model version as a worker serves it. ``directory`` holds its files."""

    name: str
    directory: Path
    version: int = 1
    engine: str = "onnxruntime"
    file: str = "model.onnx"
    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0
    instances: int = 1
    engine_class: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_queue_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = ()
    execution: str = "auto"
    hang_after_s: float = 30.0  # an engine call this long takes the model out of rotation
    max_failures: int = 5  # so do this many engine failures in a row
    description: str = ""
    #: backend-specific settings, from the config's [options] table
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    #: a declared signature, for backends whose files do not carry one (torch)
    inputs: tuple[Mapping[str, Any], ...] = ()
    outputs: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ConfigError(f"model name {self.name!r} must match [A-Za-z0-9_-]+ (a NATS token)")
        _require(type(self.version) is int and self.version >= 1, self, "version must be >= 1")
        _require(self.max_batch_size >= 1, self, "max_batch_size must be >= 1")
        _require(self.max_queue_delay_ms >= 0, self, "max_queue_delay_ms must be >= 0")
        _require(1 <= self.instances <= 64, self, "instances must be between 1 and 64")
        _require(self.max_request_bytes >= 1, self, "max_request_bytes must be >= 1")
        _require(self.max_queue_size >= 1, self, "max_queue_size must be >= 1")
        _require(self.hang_after_s > 0, self, "hang_after_s must be > 0")
        _require(self.max_failures >= 1, self, "max_failures must be >= 1")
        _require(
            all(
                type(n) is int and 1 <= n <= self.max_batch_size for n in self.preferred_batch_sizes
            ),
            self,
            "preferred_batch_sizes must be integers between 1 and max_batch_size",
        )
        _require(
            self.execution in EXECUTION_MODES, self, f"execution must be one of {EXECUTION_MODES}"
        )
        _require(
            self.execution != "inline" or self.instances == 1,
            self,
            'execution = "inline" runs on the event loop, so it takes instances = 1',
        )

    @property
    def path(self) -> Path:
        """The model file."""
        return self.directory / self.file


def _require(condition: bool, config: ModelConfig, message: str) -> None:
    if not condition:
        raise ConfigError(f"{config.directory / CONFIG_FILE}: {message}")


_KEYS: Final = frozenset(f.name for f in fields(ModelConfig)) - {"directory"}
_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "name": (str,),
    "version": (int,),
    "engine": (str,),
    "file": (str,),
    "max_batch_size": (int,),
    "max_queue_delay_ms": (int, float),
    "instances": (int,),
    "engine_class": (str,),
    "max_request_bytes": (int,),
    "max_queue_size": (int,),
    "preferred_batch_sizes": (list,),
    "execution": (str,),
    "hang_after_s": (int, float),
    "max_failures": (int,),
    "options": (dict,),
    "inputs": (list,),
    "outputs": (list,),
    "description": (str,),
}


def load_model_config(directory: Path) -> ModelConfig:
    """Read and check ``directory/config.toml``; the folder name is the default model name."""
    path = directory / CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (TOML must be UTF-8): {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    _check_keys(path, raw)
    for key in ("preferred_batch_sizes", "inputs", "outputs"):
        if key in raw:
            raw[key] = tuple(raw[key])
    config = ModelConfig(directory=directory.resolve(), **{"name": directory.name, **raw})
    if not config.path.is_file():
        raise ConfigError(f"{path}: model file {config.file!r} not found in {directory}")
    return config


def _check_keys(path: Path, raw: dict[str, Any]) -> None:
    unknown = sorted(raw.keys() - _KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; known keys are {sorted(_KEYS)}")
    for key, value in raw.items():
        # bool is an int in Python, but `version = true` is a mistake, not a version.
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            expected = " or ".join(t.__name__ for t in _TYPES[key])
            raise ConfigError(f"{path}: {key} must be {expected}, not {value!r}")


def load_repository(repository: Path) -> list[ModelConfig]:
    """Every model in a repository, ordered by name then version."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {repository} is not a folder")
    folders = sorted(p for p in repository.iterdir() if (p / CONFIG_FILE).is_file())
    if not folders:
        raise ConfigError(f"model repository {repository} has no <model>/{CONFIG_FILE}")
    configs = sorted((load_model_config(f) for f in folders), key=lambda c: (c.name, c.version))
    seen: dict[tuple[str, int], Path] = {}
    for config in configs:
        key = (config.name, config.version)
        if key in seen:
            raise ConfigError(
                f"{config.name} version {config.version} is defined twice: "
                f"{seen[key]} and {config.directory}"
            )
        seen[key] = config.directory
    return configs
