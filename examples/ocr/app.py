"""Read the text in an image through an inferbus cluster: PP-OCRv4 detection, then recognition.

    python examples/ocr/app.py page.png                      # serves the models itself
    python examples/ocr/app.py page.png --servers nats://host:4222 --codec jpeg

The workers run only the networks (``ocr-det`` and ``ocr-rec``, built by build_repo.py); this
program decodes and resizes the page, finds the boxes in the detection map, crops and pads the
lines, and decodes the recognizer's classes into text. It prints one line per text box, in
reading order: the box (left, top, right, bottom, in the image's pixels), the confidence, the text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.ocr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from PIL import Image

import inferbus
from examples.ocr import build_repo, detection, recognition
from examples.ocr.detection import Box
from examples.ocr.recognition import Reading

DET_PACK = build_repo.DET_BATCH  # pages of one size travel together, up to the model's batch
REC_PACK = build_repo.REC_BATCH // 2  # two packs in a worker's queue make one full batch
# Requests in flight: enough to keep a worker or two busy, few enough that the last one's wait
# in the queue stays seconds (a CPU worker reads a crop in ~0.1 s, a page in ~0.1-1 s).
CONCURRENCY = 4
TIMEOUT_S = 60.0
MIN_CONFIDENCE = 0.5  # lines read with less are dropped (RapidOCR's text_score)

#: pages -> for each, its text boxes as fractions of its sides (``detection.find_boxes``)
Locate = Callable[[Sequence[np.ndarray]], Awaitable[list[np.ndarray]]]
#: crops of text lines -> what each one reads
Read = Callable[[Sequence[np.ndarray]], Awaitable[list[Reading]]]


@dataclass(frozen=True, slots=True)
class Line:
    """One text box of a page and what it reads."""

    box: Box
    reading: Reading

    @property
    def kept(self) -> bool:
        return bool(self.reading.text) and self.reading.confidence >= MIN_CONFIDENCE

    def __str__(self) -> str:
        b, r = self.box, self.reading
        return f"{b.left:5d} {b.top:5d} {b.right:5d} {b.bottom:5d}  {r.confidence:.2f}  {r.text}"


async def read_pages(pages: Sequence[np.ndarray], locate: Locate, read: Read) -> list[list[Line]]:
    """The text lines of each page, in reading order; boxes where nothing was read, or not
    with ``MIN_CONFIDENCE``, are left out. ``locate`` and ``read`` run the two networks:
    through the bus (``Remote``) or, for comparison, in this process."""
    found = await locate(pages)
    boxes = [
        detection.reading_order(detection.on_page(f, p)) for f, p in zip(found, pages, strict=True)
    ]
    crops = [
        page[b.top : b.bottom, b.left : b.right]
        for page, on in zip(pages, boxes, strict=True)
        for b in on
    ]
    readings = iter(await read_by_width(crops, read))
    lines = [[Line(box, next(readings)) for box in on_page] for on_page in boxes]
    return [[line for line in on_page if line.kept] for on_page in lines]


async def read_by_width(crops: Sequence[np.ndarray], read: Read) -> list[Reading]:
    """``read(crops)``, the crops sent in order of padded width so that neighbours of one
    width are packed into one request; the readings come back in the crops' order."""
    order = sorted(range(len(crops)), key=lambda i: recognition.padded_width(crops[i]))
    readings = await read([crops[i] for i in order])
    by_crop = dict(zip(order, readings, strict=True))
    return [by_crop[i] for i in range(len(crops))]


class Remote:
    """``locate`` and ``read`` through an inferbus cluster; pages travel as ``codec``."""

    def __init__(self, client: inferbus.Client, alphabet: Sequence[str], codec: str) -> None:
        kind = detection.JpegDetector if codec == "jpeg" else detection.Detector
        self.detector = kind(client, timeout=TIMEOUT_S)
        self.recognizer = recognition.Recognizer(client, alphabet=alphabet, timeout=TIMEOUT_S)

    async def locate(self, pages: Sequence[np.ndarray]) -> list[np.ndarray]:
        found = self.detector.map(pages, pack=DET_PACK, concurrency=CONCURRENCY, progress=False)
        return [boxes async for boxes in found]

    async def read(self, crops: Sequence[np.ndarray]) -> list[Reading]:
        read = self.recognizer.map(crops, pack=REC_PACK, concurrency=CONCURRENCY, progress=False)
        return [reading async for reading in read]


@contextlib.asynccontextmanager
async def serving(servers: str | None, repo: Path) -> AsyncIterator[str]:
    """The NATS URL to use: ``servers``, or else an embedded nats-server with a worker for
    ``repo`` in this process, for as long as the context lasts."""
    if servers:
        yield servers
        return
    build_repo.say("no --servers: starting an embedded nats-server and a worker in this process")
    with inferbus.EmbeddedServer() as server:
        options = inferbus.ConnectOptions(servers=[server.url], name="ocr-example-worker")
        async with inferbus.Worker(inferbus.load_repository(repo), options):
            yield server.url


def load_page(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


async def run(pages: Sequence[np.ndarray], servers: str | None, codec: str) -> list[list[Line]]:
    repo = build_repo.build()  # the app end needs the dictionary even with a remote cluster
    alphabet = recognition.load_alphabet(repo.parent / build_repo.CHARACTERS)
    async with serving(servers, repo) as url, inferbus.connect(url) as client:
        remote = Remote(client, alphabet, codec)
        return await read_pages(pages, remote.locate, remote.read)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--servers", help="NATS URL(s) of a running cluster serving the models")
    parser.add_argument("--codec", choices=("raw", "jpeg"), default="raw",
                        help="how pages travel: uint8 pixels, or JPEG")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        pages = [load_page(path) for path in args.images]
    except OSError as exc:  # missing, unreadable, or not an image Pillow knows
        parser.error(str(exc))
    results = asyncio.run(run(pages, args.servers, args.codec))
    for path, lines in zip(args.images, results, strict=True):
        if len(args.images) > 1:
            print(f"# {path}")
        for line in lines:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
