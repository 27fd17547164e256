"""The ONNX Runtime backend: CPU everywhere, CUDA when onnxruntime-gpu provides it."""

from __future__ import annotations

import os
from typing import Any, Final

import numpy as np

from inferbus.codecs import BYTES
from inferbus.contract import Signature, Tensors, TensorSpec
from inferbus.engines.base import Engine
from inferbus.errors import ConfigError, EngineFailure

_ORT_TYPES: Final = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": BYTES,
}


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ConfigError(f"ONNX tensor {arg.name!r} has type {arg.type}, which inferbus lacks")
    # ONNX marks a free dimension with a name ("batch") or None; both become -1.
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxRuntimeEngine(Engine):
    """Serves an ONNX file with onnxruntime; string tensors travel as UTF-8 BYTES."""

    backend = "onnxruntime"

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Instances share the cores instead of each claiming all of them.
        options.intra_op_num_threads = max(1, (os.cpu_count() or 1) // self.config.instances)
        options.inter_op_num_threads = 1
        # Idle pool threads otherwise spin for a while after each run, taking the cores that
        # the NATS I/O on this machine needs; measured: +200 µs per request on two cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(
                str(self.config.path), sess_options=options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped pybind errors
            raise ConfigError(f"{self.config.path}: onnxruntime cannot load it: {exc}") from exc
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.signature = Signature(
            tuple(_spec(arg) for arg in self.session.get_inputs()),
            tuple(_spec(arg) for arg in self.session.get_outputs()),
        )
        self._string_inputs = {s.name for s in self.signature.inputs if s.datatype == BYTES}
        self._output_names = [spec.name for spec in self.signature.outputs]

    def infer(self, batch: Tensors) -> Tensors:
        feed = {
            name: _as_str(array) if name in self._string_inputs else array
            for name, array in batch.items()
        }
        try:
            values = self.session.run(self._output_names, feed)
        except Exception as exc:  # translated once, here: callers see EngineFailure only
            raise EngineFailure(f"onnxruntime: {exc}", model=self.config.name) from exc
        return {
            name: _as_bytes(value) if value.dtype == object else value
            for name, value in zip(self._output_names, values, strict=True)
        }


def _as_str(array: np.ndarray) -> np.ndarray:
    """onnxruntime takes string tensors as Python str; the wire carries bytes."""
    out = np.empty(array.shape, dtype=object)
    out.ravel()[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return out


def _as_bytes(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    out.ravel()[:] = [v.encode() if isinstance(v, str) else v for v in array.ravel()]
    return out
