"""Optimization-profile shapes from a model's signature and config, and checks against them.

TensorRT plans accept only shapes inside their profile, so the worker checks a request's
shapes before launching (a 400, not a CUDA error).
"""

from __future__ import annotations

from dataclasses import dataclass

from inferbus.contract import TensorSpec
from inferbus.engines.tensorrt.cache import BuildSettings
from inferbus.errors import BadInput, ConfigError

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ProfileShapes:
    name: str
    min: Shape
    opt: Shape
    max: Shape

    def check(self, shape: Shape) -> None:
        """Raise BadInput unless ``shape`` lies within the profile."""
        if len(shape) != len(self.min) or not all(
            low <= dim <= high for low, dim, high in zip(self.min, shape, self.max, strict=True)
        ):
            raise BadInput(
                f"input {self.name!r} shape {list(shape)} is outside the engine's profile "
                f"{list(self.min)} .. {list(self.max)}"
            )


def profile_for(spec: TensorSpec, settings: BuildSettings) -> ProfileShapes:
    """The leading free dimension is the batch (min/opt/max from the settings); any other
    free dimension needs a fixed size, since TensorRT must know every range."""
    if any(dim == -1 for dim in spec.shape[1:]):
        raise ConfigError(
            f"input {spec.name!r} has free dimensions beyond the batch {list(spec.shape)}; "
            "export the ONNX model with fixed sizes there"
        )
    if spec.shape[:1] != (-1,):
        fixed = tuple(spec.shape)
        return ProfileShapes(spec.name, fixed, fixed, fixed)
    rest = tuple(spec.shape[1:])
    return ProfileShapes(
        spec.name,
        (settings.min_batch, *rest),
        (settings.opt_batch, *rest),
        (settings.max_batch, *rest),
    )
