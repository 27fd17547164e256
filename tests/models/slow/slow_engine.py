"""A test engine that sleeps before inferring, so drain tests have requests in flight."""

import time

from inferbus.engines import OnnxRuntimeEngine, Tensors


class SlowEngine(OnnxRuntimeEngine):
    """An onnxruntime engine that takes at least ``delay_s`` per batch."""

    delay_s: float = 0.2

    def infer(self, batch: Tensors) -> Tensors:
        """Sleep, then run the model as usual."""
        time.sleep(self.delay_s)
        return super().infer(batch)
