"""Text recognition, the app end's half: crops of text lines as ``ocr-rec`` inputs, and greedy
CTC decoding of what it returns.

Crops are scaled to the network's height (48) and padded on the right to one of a few fixed
widths, so that consecutive crops of the same width can travel packed in one request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import inferbus

HEIGHT = 48  # the network's input height
WIDTHS = (160, 320, 480, 640, 960, 1280)  # padded widths; a wider crop is squeezed to the last
PAD = 128  # mid-grey: 0 after the model's normalisation, PaddleOCR's padding value
BLANK = 0  # the CTC blank class


@dataclass(frozen=True, slots=True)
class Reading:
    """The text read in one crop and the mean probability of its characters."""

    text: str
    confidence: float


def load_alphabet(path: Path) -> tuple[str, ...]:
    """Class index -> character: the CTC blank, the dictionary's characters, then a space."""
    # Split on "\n" only: read_text and splitlines would also break at other characters.
    characters = path.read_bytes().decode("utf-8").removesuffix("\n").split("\n")
    return ("", *characters, " ")


def scaled_width(crop: np.ndarray) -> int:
    """The crop's width once scaled to ``HEIGHT`` rows (at most the widest padded width)."""
    height, width = int(crop.shape[0]), int(crop.shape[1])
    return min(WIDTHS[-1], max(1, math.ceil(width * HEIGHT / height)))


def padded_width(crop: np.ndarray) -> int:
    """The fixed width a crop travels at: the narrowest one it fits."""
    width = scaled_width(crop)
    return next(padded for padded in WIDTHS if width <= padded)


def prepare(crop: np.ndarray) -> dict[str, np.ndarray]:
    """A uint8 RGB crop [h, w, 3] as the ``ocr-rec`` input [1, 48, padded width, 3]."""
    width = scaled_width(crop)
    scaled = Image.fromarray(crop).resize((width, HEIGHT), Image.Resampling.BILINEAR)
    image = np.full((1, HEIGHT, padded_width(crop), 3), PAD, dtype=np.uint8)
    image[0, :, :width] = np.asarray(scaled)
    return {"image": image}


def decode(outputs: Mapping[str, np.ndarray], alphabet: Sequence[str]) -> Reading:
    """Greedy CTC: each frame's best class, repeats collapsed, blanks dropped."""
    indices, scores = outputs["indices"][0], outputs["scores"][0]
    changed = np.ones(len(indices), dtype=bool)
    changed[1:] = indices[1:] != indices[:-1]
    kept = changed & (indices != BLANK)
    text = "".join(alphabet[index] for index in indices[kept])
    confidence = float(scores[kept].mean()) if kept.any() else 0.0
    return Reading(text.strip(), confidence)


class Recognizer(inferbus.Model[np.ndarray, Reading]):
    """A crop of one text line (uint8 RGB [h, w, 3]) in, the text read in it out."""

    name = "ocr-rec"
    # Lossless, and 4-5x smaller on a light background. JPEG costs words on 48-pixel-high crops
    # (measured on rendered pages: 51% of words right at quality 75, 92% at 95, vs 98% lossless).
    codec = "lz4"

    def __init__(
        self, client: inferbus.Client, *, alphabet: Sequence[str], timeout: float = 10.0
    ) -> None:
        super().__init__(client, timeout=timeout)
        self.alphabet = alphabet

    def preprocess(self, crop: np.ndarray) -> dict[str, np.ndarray]:
        return prepare(crop)

    def postprocess(self, outputs: inferbus.InferResult) -> Reading:
        return decode(outputs, self.alphabet)
