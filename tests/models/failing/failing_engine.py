"""A test engine that raises on demand, so error-path tests get a real engine failure."""

import numpy as np

from inferbus.engines import OnnxRuntimeEngine, Tensors


class FailingEngine(OnnxRuntimeEngine):
    """An onnxruntime engine that fails any batch whose ``x`` holds a negative value."""

    def infer(self, batch: Tensors) -> Tensors:
        """Raise ``RuntimeError`` if any value of ``x`` is negative, else run the model."""
        # Negative input is the test's switch: callers pick success or failure per request.
        if bool(np.any(np.asarray(batch["x"]) < 0)):
            raise RuntimeError("engine exploded")
        return super().infer(batch)
