"""The ``Engine`` base class: the model end's "GPU/NPU model".

Backends implement ``load`` and ``infer`` and set ``signature``; users subclass a backend and
override ``preprocess``/``postprocess`` (which do nothing by default) for node-side work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from inferbus.contract import Signature, Tensors
from inferbus.repository import ModelConfig


class Engine(ABC):
    """Runs one model version. Its calls are blocking and run off the event loop."""

    #: the backend's name as written in config.toml (``engine = "..."``)
    backend: ClassVar[str] = ""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.device = "cpu"
        self._signature: Signature | None = None

    @abstractmethod
    def load(self) -> None:
        """Load the model and set ``self.signature``. Called once, before any request."""

    @abstractmethod
    def infer(self, batch: Tensors) -> Tensors:
        """Run the network on a batch of named inputs; named outputs."""

    def preprocess(self, batch: Tensors) -> Tensors:
        """Node-side preparation of decoded inputs (e.g. normalise on the device)."""
        return batch

    def postprocess(self, outputs: Tensors) -> Tensors:
        """Node-side finishing of outputs before they are encoded."""
        return outputs

    @property
    def signature(self) -> Signature:
        """The tensors the wire carries: what clients send and receive."""
        if self._signature is None:
            raise RuntimeError(f"{type(self).__name__}: signature is read before load()")
        return self._signature

    @signature.setter
    def signature(self, value: Signature) -> None:
        self._signature = value

    def __call__(self, batch: Tensors) -> Tensors:
        return self.postprocess(self.infer(self.preprocess(batch)))

    def warm_up(self) -> None:
        """One call on zero inputs, so the first real request pays no lazy set-up."""
        self(self.signature.examples(batch=1))

    def close(self) -> None:
        """Release what ``load`` took. The default has nothing to release."""
