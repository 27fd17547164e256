"""Build the OCR example's model repository from the PP-OCRv4 models in a PyPI wheel.

    python examples/ocr/build_repo.py          # writes examples/ocr/fetched/

The wheel ``rapidocr-onnxruntime`` (Apache-2.0) carries PaddleOCR's PP-OCRv4 detection and
recognition networks as ONNX files. They take float32 NCHW BGR tensors normalised to -1..1;
this script prepends a few graph nodes so that the served models take uint8 NHWC RGB images
(4x fewer bytes on the wire than float32, and JPEG-able), and appends nodes that shrink what
comes back: the detection map as uint8, the recognition scores as one best class per frame
instead of 6,625 floats. Then it writes ``fetched/models/{ocr-det,ocr-rec}/config.toml`` and the
character dictionary the app end decodes with. It does nothing when that is already there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
FETCHED = HERE / "fetched"
WHEEL = "rapidocr-onnxruntime==1.4.4"
DET_FILE = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
REC_FILE = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
DETECTOR, RECOGNIZER = "ocr-det", "ocr-rec"
CHARACTERS = "characters.txt"
REC_HEIGHT = 48  # the recognizer's input height

# Whole pages are large and rarely the same size (so rarely batched); crops are small and many.
DET_BATCH, REC_BATCH = 4, 32
CONFIGS = {
    DETECTOR: f'engine = "onnxruntime"\nfile = "model.onnx"\nmax_batch_size = {DET_BATCH}\n',
    RECOGNIZER: f'engine = "onnxruntime"\nfile = "model.onnx"\nmax_batch_size = {REC_BATCH}\n',
}


def say(message: str) -> None:
    print(f"ocr: {message}", file=sys.stderr, flush=True)  # stdout is the app's answer


def is_built(folder: Path = FETCHED) -> bool:
    models = folder / "models"
    needed = [models / name / file for name in CONFIGS for file in ("config.toml", "model.onnx")]
    return all(path.is_file() for path in [*needed, folder / CHARACTERS])


def build(folder: Path = FETCHED) -> Path:
    """The model repository under ``folder`` (built if it is not there yet): its path."""
    if is_built(folder):
        say(f"model repository already built: {folder / 'models'}")
        return folder / "models"
    folder.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place: an interrupted build is never taken for a done one.
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        staging = Path(scratch)
        wheel = download(folder, staging)
        det, rec = extract(wheel)
        say("rewriting the graphs to take uint8 RGB images")
        write_model(staging / "models" / DETECTOR, detector_graph(det))
        write_model(staging / "models" / RECOGNIZER, recognizer_graph(rec))
        (staging / CHARACTERS).write_bytes(("\n".join(characters(rec)) + "\n").encode())
        for name in ("models", CHARACTERS):
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            (staging / name).rename(target)
    say(f"model repository ready: {folder / 'models'}")
    return folder / "models"


def download(folder: Path, scratch: Path) -> Path:
    """The wheel, from PyPI through pip, kept in ``folder`` so a rebuild needs no network
    (fetched into ``scratch`` and renamed: a half-written wheel is never found)."""
    found = sorted(folder.glob("rapidocr_onnxruntime-*.whl"))
    if found:
        return found[-1]
    say(f"downloading {WHEEL} from PyPI (15 MB)")
    # The wheel declares Python < 3.13, though it is pure data for us: ask for a 3.11 one.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--quiet", WHEEL, "-d", str(scratch)]  # fmt: skip
    subprocess.run(command, check=True)
    (wheel,) = scratch.glob("rapidocr_onnxruntime-*.whl")
    return wheel.rename(folder / wheel.name)


def extract(wheel: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    say(f"extracting the PP-OCRv4 models from {wheel.name}")
    with zipfile.ZipFile(wheel) as archive:
        det, rec = (onnx.load_from_string(archive.read(name)) for name in (DET_FILE, REC_FILE))
    return det, rec


def characters(rec: onnx.ModelProto) -> list[str]:
    """The recognizer's alphabet, which PaddleOCR's export keeps in the model's metadata."""
    (text,) = [str(prop.value) for prop in rec.metadata_props if prop.key == "character"]
    return text.split("\n")


def write_model(folder: Path, model: onnx.ModelProto) -> None:
    folder.mkdir(parents=True)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    (folder / "config.toml").write_text(CONFIGS[folder.name])


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _floats(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _image_to_network_input(network_input: str) -> list[onnx.NodeProto]:
    """uint8 NHWC RGB ``image`` -> float32 NCHW BGR in -1..1, as PaddleOCR normalises."""
    node = helper.make_node
    return [
        node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        node("Gather", ["pixels", "bgr_order"], ["bgr"], axis=3),  # RGB -> BGR
        node("Mul", ["bgr", "one_over_127_5"], ["scaled"]),
        node("Sub", ["scaled", "one"], ["normalised"]),  # (x / 255 - 0.5) / 0.5
        node("Transpose", ["normalised"], [network_input], perm=[0, 3, 1, 2]),
    ]


def _preprocessing_constants() -> list[onnx.TensorProto]:
    return [_ints("bgr_order", [2, 1, 0]), _floats("one_over_127_5", 1 / 127.5),
            _floats("one", 1.0)]  # fmt: skip


def _rewire(
    model: onnx.ModelProto,
    front: list[onnx.NodeProto],
    back: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    image_shape: list[str | int],
    outputs: list[onnx.ValueInfoProto],
) -> onnx.ModelProto:
    """The network between ``front`` (fed by a uint8 ``image``) and ``back`` (its outputs)."""
    graph = model.graph
    theirs = {t.name for t in graph.initializer} | {n for node in graph.node for n in node.output}
    ours = {t.name for t in initializers} | {n for node in [*front, *back] for n in node.output}
    if clash := ours & theirs:  # a name defined twice would rewire the network
        raise ValueError(f"{graph.name}: the added nodes reuse the names {sorted(clash)}")
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, image_shape)
    new_graph = helper.make_graph(
        [*front, *graph.node, *back],
        graph.name,
        [image],
        outputs,
        initializer=[*graph.initializer, *initializers],
    )
    rewired = helper.make_model(new_graph, opset_imports=model.opset_import)
    rewired.ir_version = model.ir_version
    rewired.metadata_props.extend(model.metadata_props)
    return rewired


def detector_graph(det: onnx.ModelProto) -> onnx.ModelProto:
    """``image`` uint8 [N, H, W, 3] -> ``probability`` uint8 [N, H, W] (text probability x 255).

    The network needs sides that are multiples of 32; the graph pads to them and crops the map
    back, so any size works (the worker's warm-up sends a 1x1 image)."""
    (network_input,) = [i.name for i in det.graph.input]
    (network_output,) = [o.name for o in det.graph.output]
    node = helper.make_node
    front = [
        *_image_to_network_input("unpadded"),
        node("Shape", ["unpadded"], ["nchw"]),
        node("Slice", ["nchw", "two", "four"], ["height_width"]),
        node("Mod", ["height_width", "thirty_two"], ["over"]),
        node("Sub", ["thirty_two", "over"], ["short"]),
        node("Mod", ["short", "thirty_two"], ["pad_hw"]),  # 0 when already a multiple
        node("Concat", ["six_zeros", "pad_hw"], ["pads"], axis=0),  # pad bottom and right
        node("Pad", ["unpadded", "pads"], [network_input], mode="constant"),
    ]
    back = [
        node("Slice", [network_output, "zeros_2", "height_width", "axes_2_3"], ["map"]),
        node("Squeeze", ["map"], ["map_nhw"], axes=[1]),
        node("Mul", ["map_nhw", "two_five_five"], ["map_255"]),
        node("Add", ["map_255", "half"], ["rounded"]),
        node("Cast", ["rounded"], ["probability"], to=TensorProto.UINT8),
    ]
    constants = [
        *_preprocessing_constants(), _ints("two", [2]), _ints("four", [4]),
        _ints("thirty_two", [32]), _ints("six_zeros", [0] * 6), _ints("zeros_2", [0, 0]),
        _ints("axes_2_3", [2, 3]), _floats("two_five_five", 255.0), _floats("half", 0.5),
    ]  # fmt: skip
    probability = helper.make_tensor_value_info(
        "probability", TensorProto.UINT8, ["batch", "height", "width"]
    )
    return _rewire(det, front, back, constants, ["batch", "height", "width", 3], [probability])


def recognizer_graph(rec: onnx.ModelProto) -> onnx.ModelProto:
    """``image`` uint8 [N, 48, W, 3] -> per frame (W / 8 of them) the best class ``indices``
    int64 [N, T] and its probability ``scores`` float32 [N, T]: all greedy CTC decoding needs."""
    (network_input,) = [i.name for i in rec.graph.input]
    (network_output,) = [o.name for o in rec.graph.output]
    node = helper.make_node
    back = [
        node("ArgMax", [network_output], ["indices"], axis=2, keepdims=0),
        node("ReduceMax", [network_output], ["scores"], axes=[2], keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "frames"]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "frames"]),
    ]
    front = _image_to_network_input(network_input)
    image_shape: list[str | int] = ["batch", REC_HEIGHT, "width", 3]
    return _rewire(rec, front, back, _preprocessing_constants(), image_shape, outputs)


if __name__ == "__main__":
    build()
