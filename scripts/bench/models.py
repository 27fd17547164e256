"""Small models and the result record shared by the benchmark scripts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper


@dataclass(frozen=True, slots=True)
class Figure:
    """One benchmark result: inferbus vs a baseline measured in the same run."""

    name: str
    measured: str
    baseline: str
    ratio: float
    target: str
    met: bool


def table(figures: list[Figure]) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| benchmark | inferbus | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        met = "yes" if f.met else "**no**"
        lines.append(
            f"| {f.name} | {f.measured} | {f.baseline} | {f.ratio:.2f}x | {f.target} | {met} |"
        )
    return "\n".join(lines)


def identity(folder: Path, elem_type: int, dims: list[int], config: str) -> Path:
    """An ONNX Identity model with a free leading dimension, and its config.toml."""
    folder.mkdir(parents=True)
    shape: list[str | int] = ["batch", *dims]
    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    (folder / "config.toml").write_text(config)
    return folder
