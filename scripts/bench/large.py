"""Codecs and large tensors: bytes on the wire, MB/s, and chunked transfers vs one message."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from onnx import TensorProto

import inferbus
from inferbus.codecs import InferRequest, encode_request
from scripts.bench import harness, models
from scripts.bench.models import Figure

MIB = 1024 * 1024
ROOT = harness.ROOT


@dataclass(frozen=True, slots=True)
class WireRow:
    data: str
    codec: str
    raw_bytes: int
    wire_bytes: int
    mb_per_s: float
    mean_error: float


WIRE_ROWS: list[WireRow] = []


def add_models(folder: Path) -> None:
    models.identity(folder / "image", TensorProto.UINT8, [224, 224, 3], "max_batch_size = 8\n")
    models.identity(folder / "floats", TensorProto.FLOAT, [1024], "max_batch_size = 1024\n")
    models.identity(folder / "pixels", TensorProto.FLOAT, [64], "max_batch_size = 512\n")
    config = 'max_batch_size = 262144\nexecution = "thread"\n'
    models.identity(folder / "blob", TensorProto.UINT8, [1024], config)


def natural_image() -> tuple[np.ndarray, str]:
    """A real photograph when scikit-learn (the train extra) is installed; else a synthetic one."""
    try:
        import importlib.resources

        photo = importlib.resources.files("sklearn.datasets") / "images" / "china.jpg"
        image = simplejpeg.decode_jpeg(photo.read_bytes(), "RGB")[100:324, 200:424]
        return np.ascontiguousarray(image), "224x224x3 photo (scikit-learn's china.jpg, crop)"
    except (ImportError, OSError):
        y, x = np.mgrid[0:224, 0:224]
        noise = np.random.default_rng(0).normal(0, 4, (224, 224, 3))
        planes = [128 + 100 * np.sin(x / 30) * np.cos(y / 40), (x + y) / 448 * 255, 255 - x]
        image = np.clip(np.stack(planes, -1) + noise, 0, 255).astype(np.uint8)
        return image, "224x224x3 synthetic image (install the train extra for a photo)"


def datasets() -> list[tuple[str, str, np.ndarray, tuple[str, ...]]]:
    with np.load(ROOT / "examples/data/digits_heldout.npz") as data:
        pixels = data["images"].reshape(-1, 64).astype(np.float32) / 16.0
    image, label = natural_image()
    floats = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    lossless = ("raw", "zstd", "lz4")
    return [
        ("360 digits, float32 pixels", "pixels", pixels, (*lossless, "fp16")),
        (label, "image", image[None], (*lossless, "jpeg")),
        ("random float32, 1 MiB", "floats", floats, (*lossless, "fp16")),
    ]


async def _codec_row(
    client: inferbus.Client, label: str, model: str, x: np.ndarray, codec: str
) -> WireRow:
    wire = len(encode_request(InferRequest("1", {"x": x}), codecs=codec))
    reply = codec if codec != "fp16" or x.dtype == np.float32 else None
    result = await client.infer(model, {"x": x}, codec=codec, reply_codec=reply)
    error = float(np.abs(result["y"].astype(np.float64) - x.astype(np.float64)).mean())
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        await client.infer(model, {"x": x}, codec=codec, reply_codec=reply)
    rate = 2 * x.nbytes * rounds / (time.perf_counter() - started) / 1e6
    return WireRow(label, codec, x.nbytes, wire, rate, error)


async def codecs(url: str, repo: Path) -> list[Figure]:
    figures = []
    with harness.worker(url, repo, "pixels", "image", "floats"):
        await harness.wait_for_models(url, {"pixels", "image", "floats"})
        async with inferbus.connect(url) as client:
            for label, model, x, names in datasets():
                for codec in names:
                    WIRE_ROWS.append(await _codec_row(client, label, model, x, codec))
    image_rows = {row.codec: row for row in WIRE_ROWS if row.data.startswith("224")}
    jpeg, raw = image_rows["jpeg"], image_rows["raw"]
    ratio = raw.wire_bytes / jpeg.wire_bytes
    figures.append(Figure(
        "jpeg (default quality 75) on a 224x224x3 image: bytes on the wire",
        f"{jpeg.wire_bytes:,} bytes, mean error {jpeg.mean_error:.1f} grey levels",
        f"{raw.wire_bytes:,} bytes raw", ratio, ">= 10x fewer", ratio >= 10,
    ))  # fmt: skip
    return figures


async def _round_trips(call: harness.Call, size: int, rounds: int) -> float:
    """MB/s moved both ways by ``rounds`` sequential calls of ``size`` bytes each way."""
    await call()
    started = time.perf_counter()
    for _ in range(rounds):
        await call()
    return 2 * size * rounds / (time.perf_counter() - started) / 1e6


async def large_tensors(url: str, repo: Path) -> list[Figure]:
    """8 MiB as one message each; 64 and 256 MiB chunked through a 1 MB server."""
    with ExitStack() as stack:
        big = stack.enter_context(inferbus.EmbeddedServer(max_payload=64 * MIB))
        small = stack.enter_context(inferbus.EmbeddedServer(max_payload=1000 * 1000))
        stack.enter_context(harness.raw_responder(big.url, "raw.echo"))
        stack.enter_context(harness.worker(big.url, repo, "blob"))
        stack.enter_context(harness.worker(small.url, repo, "blob"))
        await harness.wait_for_models(big.url, {"blob"})
        await harness.wait_for_models(small.url, {"blob"})
        # 256 MiB replies are this benchmark's point: above the client's default reply limit.
        limit = 512 * MIB
        async with (
            inferbus.connect(
                big.url, max_reply_bytes=limit, max_reply_bytes_in_flight=limit
            ) as near,
            inferbus.connect(
                small.url, max_reply_bytes=limit, max_reply_bytes_in_flight=limit
            ) as far,
        ):
            return await _large_figures(near, far)


async def _large_figures(near: inferbus.Client, far: inferbus.Client) -> list[Figure]:
    def blob(mib: int) -> dict[str, np.ndarray]:
        rows = mib * 1024
        return {"x": np.random.default_rng(mib).integers(0, 256, (rows, 1024), dtype=np.uint8)}

    def raw(mib: int) -> harness.Call:
        payload = bytes(mib * MIB)

        async def call() -> object:
            return await near.nats.request("raw.echo", payload, timeout=120)

        return call

    def ours(client: inferbus.Client, mib: int) -> harness.Call:
        x = blob(mib)

        async def call() -> object:
            return await client.infer("blob", x, timeout=120)

        return call

    async def paired(first: harness.Call, second: harness.Call, mib: int) -> tuple[float, float]:
        """Alternating rounds, so that drift on this shared machine hits both alike."""
        a, b = [], []
        for _ in range(3):
            a.append(await _round_trips(first, mib * MIB, 2))
            b.append(await _round_trips(second, mib * MIB, 2))
        return sum(a) / 3, sum(b) / 3

    raw8, ours8 = await paired(raw(8), ours(near, 8), 8)
    raw64, ours64 = await paired(raw(64), ours(far, 64), 64)
    ours256 = await _round_trips(ours(far, 256), 256 * MIB, 1)
    return [
        Figure("8 MiB tensor, raw codec, one message each way", f"{ours8:,.0f} MB/s",
               f"{raw8:,.0f} MB/s raw nats-py, same bytes", ours8 / raw8, ">= 0.9x",
               ours8 / raw8 >= 0.9),
        Figure("64 MiB tensor through a 1 MB max_payload server (chunked)", f"{ours64:,.0f} MB/s",
               f"{raw64:,.0f} MB/s raw nats-py, one 64 MiB message, 64 MB server",
               ours64 / raw64, ">= 1.5x", ours64 / raw64 >= 1.5),
        Figure("256 MiB tensor through a 1 MB max_payload server (chunked)",
               f"{ours256:,.0f} MB/s", "raw nats-py cannot: NATS caps a message at 64 MiB; "
               f"ratio to its 64 MiB rate ({raw64:,.0f} MB/s)", ours256 / raw64, "works", True),
    ]  # fmt: skip


def wire_table() -> list[str]:
    if not WIRE_ROWS:
        return []
    lines = [
        "",
        "## Codecs: bytes on the wire and end-to-end rate",
        "",
        "One request and its reply in the same codec; MB/s counts the raw tensor bytes both",
        "ways over 20 sequential round trips; error is the mean absolute difference.",
        "",
        "| data | codec | raw bytes | bytes on the wire | ratio | MB/s | mean error |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in WIRE_ROWS:
        lines.append(
            f"| {row.data} | {row.codec} | {row.raw_bytes:,} | {row.wire_bytes:,} | "
            f"{row.raw_bytes / row.wire_bytes:.1f}x | {row.mb_per_s:,.0f} | {row.mean_error:.3g} |"
        )
    return lines
