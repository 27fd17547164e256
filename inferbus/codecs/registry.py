"""The codecs by wire name: one explicit table, so no import order can leave one out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from inferbus.codecs.base import Choices, Codec, CodecChoice
from inferbus.codecs.compress import LZ4, ZSTD
from inferbus.codecs.fp16 import FP16
from inferbus.codecs.jpeg import JPEG
from inferbus.codecs.raw import RAW_CODEC
from inferbus.errors import BadInput

CODECS: Final[Mapping[str, Codec]] = {
    codec.name: codec for codec in (RAW_CODEC, ZSTD, LZ4, FP16, JPEG)
}


def get_codec(name: str) -> Codec:
    """The codec known under a wire name (its default settings)."""
    codec = CODECS.get(name)
    if codec is None:
        raise BadInput(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    return codec


def resolve(choice: CodecChoice) -> Codec:
    return get_codec(choice) if isinstance(choice, str) else choice


def codec_for(choices: Choices, tensor: str) -> Codec | None:
    """The codec chosen for one tensor: one for all, or per name; None means raw."""
    if choices is None:
        return None
    if isinstance(choices, Mapping):
        choice = choices.get(tensor)
        return None if choice is None else resolve(choice)
    return resolve(choices)
