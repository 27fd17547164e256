"""Node-side pre-processing on the device: uint8 NHWC images in, normalised float NCHW out.

The application sends uint8 pixels (a quarter of float32's bytes); the conversion happens
after the copy to the GPU, where it costs next to nothing. On a machine without CUDA the same
code runs on the CPU.
"""

from __future__ import annotations

from typing import Any

from inferbus.engines import TorchEngine

MEAN = 0.5
STD = 0.25


class NormalizeOnDevice(TorchEngine):
    def prepare_on_device(self, name: str, tensor: Any) -> Any:
        images = tensor.permute(0, 3, 1, 2).float()  # NHWC uint8 -> NCHW float, on the device
        return (images / 255.0 - MEAN) / STD
