"""inferbus: remote inference over NATS.

Application ends ``connect`` and ``infer``; model ends run a ``Worker`` over a model repository.
The model-end names (``Worker``, ``Engine`` …) load on first use, so an application end never
imports engines, onnxruntime or the metrics library just to send a request.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from inferbus.codecs import Jpeg
from inferbus.contract import Signature, TensorSpec
from inferbus.errors import (
    BadInput,
    ConfigError,
    ConnectionFailed,
    DeadlineExceeded,
    EngineFailure,
    Forbidden,
    InferbusError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    ServerError,
    Unavailable,
)
from inferbus.natsserver import EmbeddedServer
from inferbus.pipeline.client import Client, InferResult, connect
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.discovery import ModelInfo
from inferbus.pipeline.model import Model
from inferbus.pipeline.retry import RetryPolicy
from inferbus.repository import ModelConfig, load_model_config, load_repository
from inferbus.version import __version__

if _TYPE_CHECKING:
    from inferbus.engines import Engine, OnnxRuntimeEngine
    from inferbus.pipeline.worker import Worker

# Model-end names and the module that defines each, imported on first access (PEP 562).
_MODEL_END = {
    "Engine": "inferbus.engines",
    "OnnxRuntimeEngine": "inferbus.engines",
    "Worker": "inferbus.pipeline.worker",
}


def __getattr__(name: str) -> _Any:
    module = _MODEL_END.get(name)
    if module is None:
        raise AttributeError(f"module 'inferbus' has no attribute {name!r}")
    return getattr(_importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODEL_END})


__all__ = [
    "BadInput",
    "Client",
    "ConfigError",
    "ConnectOptions",
    "ConnectionFailed",
    "DeadlineExceeded",
    "EmbeddedServer",
    "Engine",
    "EngineFailure",
    "Forbidden",
    "InferResult",
    "InferbusError",
    "Jpeg",
    "Model",
    "ModelConfig",
    "ModelInfo",
    "ModelNotFound",
    "OnnxRuntimeEngine",
    "Overloaded",
    "PayloadTooLarge",
    "RequestError",
    "RetryPolicy",
    "ServerError",
    "Signature",
    "TensorSpec",
    "Unavailable",
    "Worker",
    "__version__",
    "connect",
    "load_model_config",
    "load_repository",
]
