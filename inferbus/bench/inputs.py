"""Request inputs for a benchmark: random tensors shaped by the signature, or read from a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferbus.codecs import BYTES, numpy_dtype
from inferbus.contract import Signature, TensorSpec
from inferbus.errors import BadInput


def _random(spec: TensorSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(
        batch if i == 0 and dim == -1 else max(dim, 1) for i, dim in enumerate(spec.shape)
    )
    if spec.datatype == BYTES:
        return np.array([f"sample-{v}" for v in rng.integers(0, 1000, size=shape).ravel()],
                        dtype=object).reshape(shape)  # fmt: skip
    dtype = numpy_dtype(spec.datatype)
    assert dtype is not None
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def inputs_from_signature(
    signature: Signature, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs: the leading free dimension is ``batch``, other free dimensions are 1."""
    rng = np.random.default_rng(seed)
    return {spec.name: _random(spec, batch, rng) for spec in signature.inputs}


def inputs_from_file(path: Path, signature: Signature) -> dict[str, np.ndarray]:
    """A ``.npz`` with one array per input name, or a ``.npy`` for a single-input model."""
    if path.suffix == ".npy":
        if len(signature.inputs) != 1:
            raise BadInput(f"{path}: a .npy file feeds single-input models; use .npz")
        return {signature.inputs[0].name: np.load(path, allow_pickle=False)}
    with np.load(path, allow_pickle=False) as archive:
        inputs = {name: archive[name] for name in archive.files}
    expected = {spec.name for spec in signature.inputs}
    if set(inputs) != expected:
        raise BadInput(f"{path} holds {sorted(inputs)}; the model takes {sorted(expected)}")
    return inputs
