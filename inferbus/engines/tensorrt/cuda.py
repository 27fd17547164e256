"""The few CUDA runtime calls the TensorRT engine needs, through cuda-python, each checked."""

from __future__ import annotations

from typing import Any

from inferbus.errors import ConfigError, EngineFailure


def cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise ConfigError("the tensorrt engine needs cuda-python: pip install cuda-python") from exc
    return runtime


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple; raise on any error status."""
    runtime = cudart()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != runtime.cudaError_t.cudaSuccess:
        _, text = runtime.cudaGetErrorString(error)
        raise EngineFailure(f"{call} failed: {text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
