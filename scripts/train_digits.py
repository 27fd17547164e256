"""Train a small digits classifier and export it as an inferbus example model.

Trains a scikit-learn ``MLPClassifier`` on scikit-learn's bundled 8x8 digits data set, exports
it to ONNX by hand with ``onnx.helper`` (no skl2onnx), checks that onnxruntime agrees with
scikit-learn on the held-out set, and writes:

* ``<out-dir>/models/digits/model.onnx`` and ``config.toml`` (a model folder for the repository)
* ``<out-dir>/data/digits_heldout.npz`` (``images`` uint8 [N, 8, 8] raw 0..16, ``labels`` int64)

Everything is deterministic (fixed split and seeds) and needs no network access.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

# Pixel values in load_digits() run 0..16; the model sees them scaled to 0..1.
PIXEL_MAX = 16.0
N_FEATURES = 64
N_CLASSES = 10
MIN_ACCURACY = 0.95
OPSET = 17
# IR 8 keeps the file loadable by older onnxruntime releases (>= 1.20 is what we promise).
IR_VERSION = 8

CONFIG_TOML = """\
# Digits classifier: an MLP trained by scripts/train_digits.py on scikit-learn's digits.
# Input: `pixels` FP32 [batch, 64], each pixel scaled to 0..1. Output: `logits` FP32 [batch, 10].
engine = "onnxruntime"
file = "model.onnx"
version = 1
max_batch_size = 64
instances = 1
"""

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Split:
    """The train/test split: raw images for saving, scaled features for the model."""

    train_x: FloatArray
    train_y: IntArray
    test_images: ByteArray
    test_x: FloatArray
    test_y: IntArray


def scale(images: npt.NDArray[np.generic]) -> FloatArray:
    """Flatten [N, 8, 8] images (0..16) to [N, 64] float32 features in 0..1."""
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), N_FEATURES)
    return flat / np.float32(PIXEL_MAX)


def load_split() -> Split:
    """Load the digits and split them, stratified, 80/20 with a fixed seed."""
    digits = load_digits()
    images = np.asarray(digits.images).astype(np.uint8)
    labels = np.asarray(digits.target).astype(np.int64)
    train_images, test_images, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return Split(
        train_x=scale(train_images),
        train_y=np.asarray(train_y, dtype=np.int64),
        test_images=np.asarray(test_images, dtype=np.uint8),
        test_x=scale(test_images),
        test_y=np.asarray(test_y, dtype=np.int64),
    )


def train(split: Split) -> MLPClassifier:
    """Fit the MLP; max_iter is generous so it converges without a warning."""
    model = MLPClassifier(
        hidden_layer_sizes=(64,), activation="relu", max_iter=1000, random_state=0
    )
    model.fit(split.train_x, split.train_y)
    return model


def accuracy(predicted: npt.NDArray[np.int64], labels: IntArray) -> float:
    """The fraction of predictions equal to the labels."""
    return float(np.mean(predicted == labels))


def dense_layers(
    model: MLPClassifier, n_layers: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Build MatMul/Add(/Relu) nodes and weight initializers for each layer."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "pixels"
    for i in range(n_layers):
        weight = np.asarray(model.coefs_[i], dtype=np.float32)
        bias = np.asarray(model.intercepts_[i], dtype=np.float32)
        inits += [numpy_helper.from_array(weight, f"W{i}"), numpy_helper.from_array(bias, f"B{i}")]
        last = i == n_layers - 1
        added = "logits" if last else f"h{i}_pre"
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}_mm"]))
        nodes.append(helper.make_node("Add", [f"h{i}_mm", f"B{i}"], [added]))
        if not last:
            current = f"h{i}"
            nodes.append(helper.make_node("Relu", [added], [current]))
    return nodes, inits


def to_onnx(model: MLPClassifier) -> onnx.ModelProto:
    """Export the fitted MLP as raw logits (softmax is left to the caller)."""
    # dense_layers() hard-codes relu between layers, so refuse any other activation.
    if model.activation != "relu":
        raise ValueError(f"only relu MLPs can be exported, not {model.activation!r}")
    nodes, inits = dense_layers(model, len(model.coefs_))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", N_FEATURES])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_CLASSES])],
        initializer=inits,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="inferbus scripts/train_digits.py",
        doc_string=(
            "Digits classifier: an MLP trained on scikit-learn's 8x8 digits. Input `pixels` "
            "FP32 [batch, 64] with each pixel scaled to 0..1 (raw value / 16); output `logits` "
            "FP32 [batch, 10], one score per digit 0-9 (argmax is the prediction)."
        ),
    )
    onnx_model.ir_version = IR_VERSION
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def onnx_predict(onnx_model: onnx.ModelProto, features: FloatArray) -> npt.NDArray[np.int64]:
    """Run the exported model in onnxruntime and return the argmax class per row."""
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(["logits"], {"pixels": features})
    return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)


def write_outputs(out_dir: Path, onnx_model: onnx.ModelProto, split: Split) -> list[Path]:
    """Write the model folder and the held-out set; return the paths written."""
    model_dir = out_dir / "models" / "digits"
    data_dir = out_dir / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    model_path = model_dir / "model.onnx"
    config_path = model_dir / "config.toml"
    data_path = data_dir / "digits_heldout.npz"
    onnx.save(onnx_model, model_path)
    config_path.write_text(CONFIG_TOML, encoding="utf-8")
    np.savez_compressed(data_path, images=split.test_images, labels=split.test_y)
    return [model_path, config_path, data_path]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Train an MLP on scikit-learn's digits, export it to ONNX and write the example "
            "model folder (models/digits/) and held-out set (data/digits_heldout.npz)."
        ),
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("examples"),
        help="directory to write models/digits/ and data/ under (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, export, verify and write everything."""
    args = parse_args(argv)
    split = load_split()
    model = train(split)
    sk_pred = np.asarray(model.predict(split.test_x), dtype=np.int64)
    sk_acc = accuracy(sk_pred, split.test_y)
    print(f"scikit-learn held-out accuracy: {sk_acc:.4f} ({len(split.test_y)} samples)")
    # Explicit checks rather than assert, so `python -O` cannot skip them.
    if sk_acc < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {sk_acc:.4f} is below {MIN_ACCURACY}")

    onnx_model = to_onnx(model)
    onnx_pred = onnx_predict(onnx_model, split.test_x)
    if not np.array_equal(onnx_pred, sk_pred):
        raise SystemExit("onnxruntime and scikit-learn predictions disagree on the held-out set")
    print(f"onnxruntime held-out accuracy: {accuracy(onnx_pred, split.test_y):.4f}")

    for path in write_outputs(args.out_dir, onnx_model, split):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
