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
    """Unpack a cuda-python ``(error, value...)`` tuple; raise on any error status
    (``cudaSuccess`` is 0 in every CUDA version)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise EngineFailure(f"{call} failed: {_error_text(error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _error_text(error: Any) -> str:
    try:
        _, text = cudart().cudaGetErrorString(error)
    except ConfigError:  # the caller's stand-in runtime (tests): the number is all there is
        return f"CUDA error {int(error)}"
    return text.decode() if isinstance(text, bytes) else str(text)
