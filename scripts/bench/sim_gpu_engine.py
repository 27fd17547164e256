"""A simulated GPU engine: a fixed 20 ms per batch whatever its size, the wait releasing the GIL.

It stands in for a GPU in the batching benchmark: what it measures is how well the worker keeps
the "device" busy with full batches, which is what a real GPU needs.
"""

from __future__ import annotations

import time

import numpy as np

from inferbus.engines import Engine, Signature, Tensors, TensorSpec

BATCH_SECONDS = 0.020


class SimulatedGpuEngine(Engine):
    backend = "simulated-gpu"

    def load(self) -> None:
        self.device = "simulated"
        spec = (TensorSpec("x", "FP32", (-1, 16)),)
        self.signature = Signature(spec, (TensorSpec("y", "FP32", (-1, 16)),))

    def infer(self, batch: Tensors) -> Tensors:
        time.sleep(BATCH_SECONDS)  # time.sleep releases the GIL, as a CUDA sync would
        return {"y": np.asarray(batch["x"])}
