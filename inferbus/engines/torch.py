"""The PyTorch backend (extra ``[torch]``): a ``torch.export`` program (.pt2) or TorchScript
file (.pt), on CUDA when present, else the CPU.

Neither format records tensor names reliably, so the config declares the signature:
``inputs``/``outputs`` lists of ``{name, datatype, shape}``; inputs are passed to the module
positionally in that order, and its outputs (a tensor, a tuple or a dict) are named by it.
The instances of a model version share one loaded module (one copy of the weights; an eval
module's forward keeps no state, so threads may call it at once). On CUDA each instance runs on
a stream no other instance holds (checked on GPU machines by scripts/gpu_check.py; this
machine has no GPU).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inferbus.codecs import BYTES
from inferbus.contract import Signature, Tensors, TensorSpec
from inferbus.engines.base import Engine
from inferbus.engines.shared import Lease, SharedLoads
from inferbus.errors import ConfigError, EngineFailure

#: loaded modules by (file, its size and mtime, device), leased by the instances serving them
MODULES: SharedLoads[Any] = SharedLoads()
#: torch hands out streams from a fixed pool (32 per device and priority), round robin
STREAM_POOL_SIZE = 32
_streams_held: set[int] = set()
_streams_lock = threading.Lock()


def declared_signature(inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]],
                       where: str) -> Signature:  # fmt: skip
    """The ``inputs``/``outputs`` a config declares, checked."""
    if not inputs or not outputs:
        raise ConfigError(f"{where}: declare `inputs` and `outputs` ({{name, datatype, shape}})")
    try:
        signature = Signature(
            tuple(TensorSpec.from_dict(spec) for spec in inputs),
            tuple(TensorSpec.from_dict(spec) for spec in outputs),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: each tensor needs name, datatype and shape ({exc})") from exc
    if any(spec.datatype == BYTES for spec in (*signature.inputs, *signature.outputs)):
        raise ConfigError(f"{where}: torch tensors cannot hold BYTES")
    return signature


class TorchEngine(Engine):
    backend = "torch"

    def load(self) -> None:
        try:
            import torch
        except ImportError as exc:
            raise ConfigError(
                "the torch engine needs PyTorch: pip install 'inferbus[torch]'"
            ) from exc
        self._torch = torch
        self.signature = declared_signature(self.config.inputs, self.config.outputs,
                                            str(self.config.directory / "config.toml"))  # fmt: skip
        self._cuda = torch.cuda.is_available()
        self.device = "cuda" if self._cuda else "cpu"
        if not self._cuda:  # instances share the cores instead of each claiming all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.config.instances))
        path = self.config.path
        try:
            stat = path.stat()
        except OSError as exc:
            raise ConfigError(f"{path}: torch cannot load it: {exc}") from exc
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, self.device)
        lease = MODULES.acquire(key, lambda: self._load_module(torch))
        self._lease: Lease[Any] | None = lease
        self._module = lease.value
        self._stream = own_stream(torch) if self._cuda else None

    def close(self) -> None:
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            with _streams_lock:
                _streams_held.discard(stream.cuda_stream)
        lease, self._lease = getattr(self, "_lease", None), None
        if lease is not None:
            self._module = None  # the last lease out drops the weights
            lease.release()

    def _load_module(self, torch: Any) -> Any:
        path = self.config.path
        try:
            if path.suffix == ".pt2":
                return exported_on(torch, torch.export.load(str(path)), self.device)
            module = torch.jit.load(str(path), map_location=self.device)
            module.eval()
        except Exception as exc:  # torch raises many types for a bad file
            raise ConfigError(f"{path}: torch cannot load it: {exc}") from exc
        return module.to(self.device)

    def infer(self, batch: Tensors) -> Tensors:
        torch = self._torch
        try:
            with torch.inference_mode():
                if self._stream is None:
                    result = self._module(*self._inputs(batch))
                    return self._outputs(result)
                with torch.cuda.stream(self._stream):
                    result = self._module(*self._inputs(batch))
                    outputs = self._outputs(result)
                self._stream.synchronize()
                return outputs
        except EngineFailure:
            raise
        except Exception as exc:  # translated once, here: callers see EngineFailure only
            raise EngineFailure(
                f"torch: {type(exc).__name__}: {exc}", model=self.config.name
            ) from exc

    def _inputs(self, batch: Tensors) -> list[Any]:
        torch = self._torch
        tensors = []
        with warnings.catch_warnings():
            # Decoded inputs are read-only views of the message; inference never writes them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for spec in self.signature.inputs:
                tensor = torch.from_numpy(np.asarray(batch[spec.name]))
                if self._cuda:  # a plain copy: with nothing to overlap, pinning first only adds one
                    tensor = tensor.to(self.device)
                tensors.append(self.prepare_on_device(spec.name, tensor))
        return tensors

    def prepare_on_device(self, name: str, tensor: Any) -> Any:
        """Node-side work on an input already on the device (e.g. uint8 → normalised float),
        so the wire carries the compact form. The default passes it through."""
        return tensor

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self.signature.outputs]
        if isinstance(result, Mapping):
            values = [result[name] for name in names]
        elif isinstance(result, tuple | list):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(names):
            raise EngineFailure(
                f"the module returned {len(values)} outputs; the config names {names}"
            )
        return {
            name: value.detach().cpu().numpy() for name, value in zip(names, values, strict=True)
        }


def exported_on(torch: Any, program: Any, device: str) -> Any:
    """An exported program's module on ``device``. ``module().to(device)`` would move the
    weights but leave devices written into the graph (``aten.ones(..., device=cpu)`` stays on
    the CPU); ``move_to_device_pass`` is PyTorch's documented way to move both."""
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device).module()


def own_stream(torch: Any) -> Any:
    """A CUDA stream that no other instance in this process holds. ``torch.cuda.Stream()``
    draws from a round-robin pool, so other code drawing too could hand two instances the same
    stream (serialising them); draw until a free one comes, and refuse beyond the pool."""
    with _streams_lock:
        for _ in range(STREAM_POOL_SIZE):
            stream = torch.cuda.Stream()
            if stream.cuda_stream not in _streams_held:
                _streams_held.add(stream.cuda_stream)
                return stream
    raise ConfigError(
        f"every one of torch's {STREAM_POOL_SIZE} pooled CUDA streams is held by an instance; "
        "serve with fewer instances (more than a few rarely helps one GPU)"
    )
