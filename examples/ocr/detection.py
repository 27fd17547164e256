"""Text detection, the app end's half: resize the page for ``ocr-det``, and turn the text
probability map it returns into boxes (PaddleOCR's DB post-processing, simplified).

Simplified: boxes are axis-aligned rectangles around connected regions of the thresholded map
(scipy.ndimage), not rotated rectangles around contours; that suits horizontal text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage  # type: ignore[import-untyped]  # scipy ships no type hints

import inferbus

MAX_SIDE = 960  # PaddleOCR's default upscales small pages to 736 on the short side: no better
STRIDE = 32  # the network halves the image five times
THRESHOLD = 0.3  # a pixel is text above this probability
BOX_THRESHOLD = 0.5  # a region is kept if its box's mean probability is above this
UNCLIP_RATIO = 1.6  # DB's maps shrink text regions; grow each box back by area * ratio / perimeter
MIN_SIDE = 3  # pixels of the map


@dataclass(frozen=True, slots=True, order=True)
class Box:
    """A rectangle in a page's pixels, ``right`` and ``bottom`` exclusive."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def center_y(self) -> float:
        return (self.top + self.bottom) / 2


def network_size(height: int, width: int) -> tuple[int, int]:
    """Height and width for the network: at most ``MAX_SIDE``, multiples of ``STRIDE``."""
    scale = min(1.0, MAX_SIDE / max(height, width))

    def fit(side: int) -> int:
        return max(STRIDE, round(side * scale / STRIDE) * STRIDE)

    return fit(height), fit(width)


def prepare(page: np.ndarray) -> dict[str, np.ndarray]:
    """A uint8 RGB page [H, W, 3] as the ``ocr-det`` input: resized, batch of one."""
    height, width = network_size(*page.shape[:2])
    resized = Image.fromarray(page).resize((width, height), Image.Resampling.BILINEAR)
    return {"image": np.asarray(resized)[None]}


def find_boxes(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Text boxes in the map, [K, 4] (left, top, right, bottom) as fractions of its width and
    height: resizing keeps fractions, so they hold on the page at any size."""
    probability = outputs["probability"][0].astype(np.float32) / 255
    text = ndimage.binary_dilation(probability > THRESHOLD, structure=np.ones((2, 2)))
    labels, _ = ndimage.label(text)
    height, width = probability.shape
    boxes = []
    for rows, cols in ndimage.find_objects(labels):
        box_height, box_width = rows.stop - rows.start, cols.stop - cols.start
        if min(box_height, box_width) < MIN_SIDE:
            continue
        if probability[rows, cols].mean() < BOX_THRESHOLD:
            continue
        grow = box_height * box_width * UNCLIP_RATIO / (2 * (box_height + box_width))
        boxes.append(
            (
                max(0.0, cols.start - grow) / width,
                max(0.0, rows.start - grow) / height,
                min(width, cols.stop + grow) / width,
                min(height, rows.stop + grow) / height,
            )
        )
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def on_page(fractions: np.ndarray, page: np.ndarray) -> list[Box]:
    """Fractional boxes from ``find_boxes`` in the pixels of ``page`` (none left empty)."""
    height, width = page.shape[:2]
    scaled = np.rint(fractions * [width, height, width, height]).astype(int)
    boxes = [Box(*map(int, row)) for row in scaled]
    return [box for box in boxes if box.right > box.left and box.bottom > box.top]


def reading_order(boxes: list[Box]) -> list[Box]:
    """Top to bottom, and left to right within a line: a box whose middle lies within the
    first box of the line being gathered belongs to that line."""
    ordered: list[Box] = []
    line: list[Box] = []
    for box in sorted(boxes, key=lambda b: (b.top, b.left)):
        if line and not line[0].top <= box.center_y < line[0].bottom:
            ordered += sorted(line, key=lambda b: b.left)
            line = []
        line.append(box)
    return ordered + sorted(line, key=lambda b: b.left)


class Detector(inferbus.Model[np.ndarray, np.ndarray]):
    """A page (uint8 RGB [H, W, 3]) in, its text boxes as fractions of its sides out
    (``on_page`` turns them into pixels: a Model's postprocess sees only the outputs)."""

    name = "ocr-det"
    reply_codec = "lz4"  # the map is mostly zeros: ~1/80 of its bytes on our test pages

    def preprocess(self, page: np.ndarray) -> dict[str, np.ndarray]:
        return prepare(page)

    def postprocess(self, outputs: inferbus.InferResult) -> np.ndarray:
        return find_boxes(outputs)


class JpegDetector(Detector):
    """The same, the page travelling as JPEG (the worker decodes it back to uint8 pixels)."""

    codec = inferbus.Jpeg()  # quality 75: as many words read as raw pixels, measured
