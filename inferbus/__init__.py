"""inferbus: remote inference over NATS.

Application ends ``connect`` and ``infer``; model ends run a ``Worker`` over a model repository.
"""

__version__ = "0.1.0"

from inferbus.engines import Engine, OnnxRuntimeEngine, Signature, TensorSpec
from inferbus.errors import (
    BadInput,
    ConfigError,
    ConnectionFailed,
    DeadlineExceeded,
    EngineFailure,
    InferbusError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    ServerError,
    Unavailable,
)
from inferbus.natsserver import EmbeddedServer
from inferbus.pipeline._retry import RetryPolicy
from inferbus.pipeline.client import Client, InferResult, connect
from inferbus.pipeline.discovery import ModelInfo
from inferbus.pipeline.model import Model
from inferbus.pipeline.worker import Worker
from inferbus.repository import ModelConfig, load_model_config, load_repository

__all__ = [
    "BadInput",
    "Client",
    "ConfigError",
    "ConnectionFailed",
    "DeadlineExceeded",
    "EmbeddedServer",
    "Engine",
    "EngineFailure",
    "InferResult",
    "InferbusError",
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
