"""Test pages for the OCR example: lines of random English words and numbers, black on white,
with the text that was drawn.

    python examples/ocr/render.py page.png --seed 3     # writes a page, prints its lines

The font is Pillow's own scalable one (``ImageFont.load_default(size=...)``, Aileron Regular,
bundled in the wheel), so no system font is needed and every machine draws the same pixels.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_WORD_LIST = """
about above across after again against almost along already also always among animal answer
apple around autumn basket beach became before began behind being below better between bicycle
bird black bottle bread bridge bright brother brown build butter camera candle carry castle
center chair change cheese circle city clean clock cloud coffee color corner country cover dance
danger garden gentle glass golden green ground happy harbor heavy honest horse house island
kitchen ladder lemon letter light little market matter middle minute money morning mountain
music nature number ocean office orange paper pencil people picture planet pocket purple quiet
rabbit river rocket season second silver simple sister small spring square station stone story
summer table thunder ticket tomato travel under valley village water weather window winter
wonder yellow yesterday
"""
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True, slots=True)
class Page:
    """A rendered page (uint8 RGB, [H, W, 3]) and the lines of text drawn on it, top to bottom."""

    image: np.ndarray
    lines: tuple[str, ...]

    @property
    def words(self) -> list[str]:
        return [word for line in self.lines for word in line.split()]


def random_word(rng: random.Random) -> str:
    """Mostly dictionary words (some capitalised), one in five a number of 1 to 5 digits."""
    if rng.random() < 0.2:
        return str(rng.randrange(10 ** rng.randint(1, 5)))
    word = rng.choice(WORDS)
    return word.capitalize() if rng.random() < 0.3 else word


def render(
    seed: int, *, width: int = 640, height: int = 320, lines: int = 4, font_size: int = 26
) -> Page:
    """A page with ``lines`` lines of two to four words each, placed at random indents."""
    rng = random.Random(seed)
    font = ImageFont.load_default(size=font_size)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    pitch = height // (lines + 1)
    drawn = []
    for index in range(lines):
        text = " ".join(random_word(rng) for _ in range(rng.randint(2, 4)))
        while font.getlength(text) > width * 0.6 and " " in text:  # keep to the page
            text = text.rsplit(" ", 1)[0]
        left = rng.randint(font_size, int(width * 0.35))
        top = pitch * (index + 1) - font_size // 2 + rng.randint(-4, 4)
        draw.text((left, top), text, fill=(0, 0, 0), font=font)
        drawn.append(text)
    return Page(np.asarray(page), tuple(drawn))


def words_in_order(truth: Sequence[str], read: Sequence[str]) -> int:
    """How many words of ``truth`` were read exactly and in order: the length of the longest
    common subsequence, so a missed space, a wrong letter or a line out of place all cost."""
    best = [0] * (len(read) + 1)
    for word in truth:
        diagonal = 0  # best[j - 1] of the row before
        for j, other in enumerate(read, start=1):
            diagonal, best[j] = (
                best[j],
                diagonal + 1 if word == other else max(best[j], best[j - 1]),
            )
    return best[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a test page; print the lines on it.")
    parser.add_argument("output", type=Path, help="image file to write, e.g. page.png")
    parser.add_argument("--seed", type=int, default=0, help="another seed, another page")
    args = parser.parse_args()
    page = render(args.seed)
    Image.fromarray(page.image).save(args.output)
    print("\n".join(page.lines))


if __name__ == "__main__":
    main()
