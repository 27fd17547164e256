"""Model-end engines: the ``Engine`` base class and its backends."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Final

from inferbus.contract import Signature, Tensors, TensorSpec
from inferbus.engines.base import Engine
from inferbus.engines.onnxruntime import OnnxRuntimeEngine
from inferbus.engines.tensorrt.engine import TensorRTEngine
from inferbus.engines.torch import TorchEngine
from inferbus.errors import ConfigError
from inferbus.repository import ModelConfig

BACKENDS: Final[dict[str, type[Engine]]] = {
    OnnxRuntimeEngine.backend: OnnxRuntimeEngine,
    TorchEngine.backend: TorchEngine,  # imports torch only when a model asks for it
    TensorRTEngine.backend: TensorRTEngine,  # GPU nodes with TensorRT only
}

__all__ = [
    "BACKENDS",
    "Engine",
    "OnnxRuntimeEngine",
    "Signature",
    "TensorRTEngine",
    "TensorSpec",
    "Tensors",
    "TorchEngine",
    "create_engine",
]


def create_engine(config: ModelConfig) -> Engine:
    """The (not yet loaded) engine a model config asks for."""
    if config.engine_class:
        cls = _user_class(config)
    else:
        try:
            cls = BACKENDS[config.engine]
        except KeyError:
            known = ", ".join(sorted(BACKENDS))
            raise ConfigError(
                f"{config.name}: unknown engine {config.engine!r}; available here: {known}"
            ) from None
    return cls(config)


def _user_class(config: ModelConfig) -> type[Engine]:
    """Load ``file.py:Class`` (in the model folder) or ``package.module:Class``."""
    assert config.engine_class is not None
    target, _, class_name = config.engine_class.partition(":")
    if not class_name:
        raise ConfigError(f"{config.name}: engine_class must look like 'file.py:Class'")
    try:
        if target.endswith(".py"):
            path = config.directory / target
            module_name = f"inferbus_models.{config.name}_v{config.version}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"{config.name}: cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (ImportError, OSError) as exc:
        raise ConfigError(f"{config.name}: cannot import {target}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise ConfigError(f"{config.name}: {config.engine_class} is not an Engine subclass")
    return cls
