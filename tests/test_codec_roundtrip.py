"""Round trips through every codec, the errors for what a codec cannot carry, and the limits.

Covers inferbus.codecs.{raw,compress,fp16,jpeg} as seen through encode_request/decode_request
(and the response functions): what each codec carries exactly or within its stated loss, the
400s for tensors it cannot carry (client side and worker side), per-input codec choice, the
``reply_codec`` parameter, and the ``limit`` that bounds what decoding may allocate (413).
"""

from __future__ import annotations

import functools
import re
import struct
import tracemalloc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lz4.frame
import numpy as np
import numpy.typing as npt
import orjson
import pytest
import zstandard

from inferbus.codecs import (
    InferRequest,
    InferResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from inferbus.codecs.base import Choices
from inferbus.codecs.compress import Zstd
from inferbus.codecs.jpeg import Jpeg
from inferbus.codecs.raw import Raw
from inferbus.errors import BadInput, PayloadTooLarge
from tests._datatypes import NUMERIC, random_array

Array = npt.NDArray[Any]

KNOWN_CODECS = ("fp16", "jpeg", "lz4", "raw", "zstd")
LOSSLESS = ("raw", "zstd", "lz4")
ALL_DATATYPES = (*NUMERIC, "BYTES")
# Sent together in one request, so that each test also covers a multi-tensor body.
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "empty": (0,),
    "empty-inner": (2, 0, 3),
    "vector": (7,),
    "matrix": (3, 4),
    "cube": (2, 3, 4),
}
MIB = 1 << 20


# --------------------------------------------------------------------------------- helpers


def values(datatype: str, shape: tuple[int, ...], seed: int = 0) -> Array:
    """Values over the datatype's whole range (ints), or spread wide with specials (floats)."""
    array = random_array(datatype, shape, seed)
    if array.dtype.kind != "f":
        return array
    flat = array.reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=array.dtype)
    flat[: min(flat.size, specials.size)] = specials[: flat.size]
    return array


def request(inputs: Mapping[str, Array], **kwargs: Any) -> InferRequest:
    return InferRequest(id="req-1", inputs=dict(inputs), **kwargs)


def roundtrip(
    inputs: Mapping[str, Array], codecs: Choices, limit: int = 1 << 30
) -> dict[str, Array]:
    body = encode_request(request(inputs), codecs)
    return dict(decode_request(body, limit).inputs)


def header_of(body: bytes) -> dict[str, Any]:
    (length,) = struct.unpack_from("<I", body)
    header: dict[str, Any] = orjson.loads(body[4 : 4 + length])
    return header


def data_of(body: bytes) -> bytes:
    (length,) = struct.unpack_from("<I", body)
    return body[4 + length :]


def frame(header: object, data: bytes = b"") -> bytes:
    json = orjson.dumps(header)
    return struct.pack("<I", len(json)) + json + data


def tensor_body(
    datatype: str, shape: list[int], data: bytes, codec: str | None = None, name: str = "a"
) -> bytes:
    """A request body holding one tensor, built by hand (no encoder checks)."""
    parameters: dict[str, Any] = {"binary_data_size": len(data)}
    if codec is not None:
        parameters["codec"] = codec
    entry = {"name": name, "datatype": datatype, "shape": shape, "parameters": parameters}
    return frame({"id": "hand-built", "inputs": [entry]}, data)


def assert_exact(decoded: Array, original: Array) -> None:
    """Same shape, the datatype's little-endian dtype, and the same bits (NaNs included)."""
    expected = original.astype(original.dtype.newbyteorder("<"))
    assert decoded.shape == expected.shape
    assert decoded.dtype == expected.dtype
    assert np.ascontiguousarray(decoded).tobytes() == np.ascontiguousarray(expected).tobytes()
    np.testing.assert_array_equal(decoded, expected)


@contextmanager
def traced_peak() -> Iterator[list[int]]:
    """The peak bytes allocated inside the block (numpy buffers included), in result[0]."""
    result = [0]
    tracemalloc.start()
    try:
        yield result
    finally:
        result[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def smooth_image(height: int, width: int, channels: int, phase: float = 0.0) -> Array:
    """A natural-looking image: a gradient under slow sines, different per channel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [
        128
        + 60 * np.sin(x / 17.0 + k + phase) * np.cos(y / 23.0 - k)
        + 40 * (x + y) / (height + width)
        - 20
        for k in range(channels)
    ]
    image: Array = np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)
    return image


def mean_abs_error(a: Array, b: Array) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@functools.cache
def zeros_64mib(codec: str) -> bytes:
    """64 MiB of zeros, compressed: a decompression bomb of a few kilobytes."""
    zeros = bytes(64 * MIB)
    if codec == "zstd":
        return zstandard.ZstdCompressor().compress(zeros)
    return bytes(lz4.frame.compress(zeros, store_size=True))


def compress(codec: str, plain: bytes, *, store_size: bool = True) -> bytes:
    if codec == "zstd":
        if store_size:
            return zstandard.ZstdCompressor().compress(plain)
        streaming = zstandard.ZstdCompressor().compressobj()  # no content size in the frame
        return streaming.compress(plain) + streaming.flush()
    return bytes(lz4.frame.compress(plain, store_size=store_size))


def bytes_layout(elements: list[bytes]) -> bytes:
    """Triton's BYTES layout: u32 LE length, then the element, for each element."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# ------------------------------------------------------------- lossless codecs: exact trips


@pytest.mark.parametrize("datatype", list(NUMERIC))
@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_codec_round_trips_numeric_exactly(codec: str, datatype: str) -> None:
    inputs = {
        name: values(datatype, shape, seed=i) for i, (name, shape) in enumerate(SHAPES.items())
    }
    body = encode_request(request(inputs), codec)
    decoded = decode_request(body).inputs
    assert list(decoded) == list(inputs)
    for name, original in inputs.items():
        assert_exact(decoded[name], original)
    for entry in header_of(body)["inputs"]:
        assert entry["datatype"] == datatype
        assert entry["parameters"].get("codec") == (None if codec == "raw" else codec)


@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_codec_round_trips_str_arrays(codec: str) -> None:
    words = ["", "a", "héllo wörld", "日本語", "x" * 300, "tab\there", "\x00inner"]
    inputs: dict[str, Array] = {
        "scalar": np.array("solo"),
        "empty": np.array([], dtype=str),
        "empty-inner": np.empty((2, 0, 3), dtype=str),
        "vector": np.array(words),
        "matrix": np.array(words[:6]).reshape(2, 3),
        "objects": np.array(words, dtype=object),
    }
    decoded = roundtrip(inputs, codec)
    for name, original in inputs.items():
        got = decoded[name]
        assert got.shape == original.shape, name
        assert got.dtype == np.dtype(object), name
        assert got.ravel().tolist() == [str(w).encode() for w in original.ravel().tolist()], name


@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_codec_round_trips_bytes_arrays(codec: str) -> None:
    elements = [b"", b"\x00", b"\x00\xff\x00", bytes(range(256)), b"trailing nul\x00", b"z" * 5000]
    inputs: dict[str, Array] = {
        "scalar": np.array(b"\x01\x02"),
        "fixed": np.array([b"ab", b"cde", b""]),  # numpy 'S' dtype (no trailing NULs here)
        "objects": np.array(elements, dtype=object),
        "grid": np.array(elements, dtype=object).reshape(2, 3),
        "empty": np.array([], dtype=object),
    }
    decoded = roundtrip(inputs, codec)
    for name, original in inputs.items():
        got = decoded[name]
        assert got.shape == original.shape, name
        assert got.ravel().tolist() == original.ravel().tolist(), name
        assert all(type(e) is bytes for e in got.ravel().tolist()), name


@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_codec_round_trips_responses(codec: str) -> None:
    outputs = {
        "logits": values("FP32", (2, 5)),
        "ids": values("INT64", (2,)),
        "labels": np.array(["cat", "dog"]),
    }
    response = InferResponse(id="r", model_name="m", model_version="3", outputs=outputs)
    decoded = decode_response(encode_response(response, codec))
    assert (decoded.id, decoded.model_name, decoded.model_version) == ("r", "m", "3")
    assert_exact(decoded.outputs["logits"], outputs["logits"])
    assert_exact(decoded.outputs["ids"], outputs["ids"])
    assert decoded.outputs["labels"].tolist() == [b"cat", b"dog"]


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressing_codecs_shrink_redundant_data(codec: str) -> None:
    array = np.zeros((256, 256), dtype=np.float32)
    raw_body = encode_request(request({"a": array}))
    body = encode_request(request({"a": array}), codec)
    assert len(body) * 20 < len(raw_body)
    assert_exact(decode_request(body).inputs["a"], array)


def test_non_contiguous_and_big_endian_inputs_round_trip_through_every_lossless_codec() -> None:
    base = values("INT32", (4, 6))
    inputs: dict[str, Array] = {
        "transposed": base.T,
        "strided": base[:, ::2],
        "big-endian": values("FP64", (3, 2)).astype(">f8"),
    }
    for codec in LOSSLESS:
        decoded = roundtrip(inputs, codec)
        for name, original in inputs.items():
            assert_exact(decoded[name], original)


def test_raw_is_never_written_as_a_codec_parameter() -> None:
    array = values("INT16", (3,))
    for choice in ("raw", Raw(), {"a": "raw"}):
        body = encode_request(request({"a": array}), choice)
        assert "codec" not in header_of(body)["inputs"][0]["parameters"]
        assert body == encode_request(request({"a": array}))
    explicit = tensor_body("INT16", [3], array.tobytes(), codec="raw")
    assert_exact(decode_request(explicit).inputs["a"], array)


# ---------------------------------------------------------------------------- fp16 (lossy)


def test_fp16_restores_float32_within_half_precision() -> None:
    rng = np.random.default_rng(7)
    magnitudes = np.exp(rng.uniform(np.log(1e-4), np.log(6e4), size=4000))
    signs = rng.choice([-1.0, 1.0], size=4000)
    normal = (magnitudes * signs).astype(np.float32).reshape(40, 100)
    inputs = {
        "normal": normal,
        "scalar": np.array(3.14159, dtype=np.float32),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "edges": np.array([0.0, -0.0, 65504.0, -65504.0, 1.0, -2.5], dtype=np.float32),
    }
    body = encode_request(request(inputs), "fp16")
    raw_body = encode_request(request(inputs))
    assert len(data_of(body)) * 2 == len(data_of(raw_body))  # two bytes an element, not four
    decoded = decode_request(body).inputs
    for name, original in inputs.items():
        got = decoded[name]
        assert got.shape == original.shape, name
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, original, rtol=1e-3, atol=0)
    np.testing.assert_array_equal(decoded["edges"], inputs["edges"])  # exactly representable


def test_fp16_turns_magnitudes_above_65504_into_inf() -> None:
    """Documented loss: |x| > 65504 (after rounding) overflows to +-inf, silently."""
    array = np.array([65504.0, 65519.0, 65520.0, 1e5, -7e4, 3.4e38, np.inf], dtype=np.float32)
    decoded = roundtrip({"a": array}, "fp16")["a"]
    expected = np.array([65504.0, 65504.0, np.inf, np.inf, -np.inf, np.inf, np.inf], np.float32)
    np.testing.assert_array_equal(decoded, expected)


def test_fp16_keeps_nan() -> None:
    decoded = roundtrip({"a": np.array([np.nan, 1.0], dtype=np.float32)}, "fp16")["a"]
    assert np.isnan(decoded[0])
    assert decoded[1] == 1.0


# ---------------------------------------------------------------------------- jpeg (lossy)


def test_jpeg_rgb_image_is_small_and_close() -> None:
    image = smooth_image(224, 224, 3)
    raw_body = encode_request(request({"image": image}))
    body = encode_request(request({"image": image}), Jpeg(quality=90))
    entry = header_of(body)["inputs"][0]
    assert entry["parameters"]["codec"] == "jpeg"
    assert entry["shape"] == [224, 224, 3]
    assert len(body) * 10 <= len(raw_body)
    decoded = decode_request(body).inputs["image"]
    assert decoded.shape == image.shape
    assert decoded.dtype == np.uint8
    assert mean_abs_error(decoded, image) < 6


def test_jpeg_greyscale_image() -> None:
    image = smooth_image(61, 47, 1)  # odd sizes on purpose
    decoded = roundtrip({"image": image}, "jpeg")["image"]
    assert decoded.shape == (61, 47, 1)
    assert decoded.dtype == np.uint8
    assert mean_abs_error(decoded, image) < 6


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_batch_keeps_each_image(channels: int) -> None:
    batch = np.stack([smooth_image(40, 56, channels, phase=p) for p in (0.0, 1.5, 3.0)])
    body = encode_request(request({"images": batch}), "jpeg")
    decoded = decode_request(body).inputs["images"]
    assert decoded.shape == (3, 40, 56, channels)
    assert decoded.dtype == np.uint8
    for index in range(3):
        assert mean_abs_error(decoded[index], batch[index]) < 6
    # Images are not mixed up: each is much closer to its own original than to another.
    assert mean_abs_error(decoded[0], batch[0]) * 3 < mean_abs_error(decoded[0], batch[1])


def test_jpeg_empty_batch() -> None:
    batch = np.zeros((0, 8, 8, 3), dtype=np.uint8)
    body = encode_request(request({"images": batch}), "jpeg")
    assert header_of(body)["inputs"][0]["parameters"]["binary_data_size"] == 0
    decoded = decode_request(body).inputs["images"]
    assert decoded.shape == (0, 8, 8, 3)
    assert decoded.dtype == np.uint8


def test_jpeg_quality_trades_bytes() -> None:
    image = smooth_image(128, 128, 3)
    low = encode_request(request({"image": image}), Jpeg(quality=50))
    high = encode_request(request({"image": image}), Jpeg(quality=95))
    assert len(low) < len(high)
    assert header_of(low)["inputs"][0]["parameters"]["codec"] == "jpeg"
    for body in (low, high):
        assert mean_abs_error(decode_request(body).inputs["image"], image) < 6


@pytest.mark.parametrize("quality", [0, 101, -5])
def test_jpeg_quality_out_of_range(quality: int) -> None:
    with pytest.raises(BadInput, match="quality"):
        Jpeg(quality=quality)


# ------------------------------------------------------- what a codec cannot carry: 400s


FP16_REFUSES = [d for d in ALL_DATATYPES if d != "FP32"]
JPEG_REFUSES_DATATYPE = [d for d in ALL_DATATYPES if d != "UINT8"]
JPEG_REFUSES_SHAPE: list[tuple[int, ...]] = [
    (),
    (12,),
    (4, 4),
    (4, 4, 2),
    (4, 4, 4),
    (2, 4, 4, 2),
    (1, 2, 4, 4, 3),
]


def array_of(datatype: str, shape: tuple[int, ...]) -> Array:
    if datatype == "BYTES":
        return np.full(shape, "x", dtype=object)
    return values(datatype, shape)


@pytest.mark.parametrize("datatype", FP16_REFUSES)
def test_fp16_refuses_other_datatypes_on_encode(datatype: str) -> None:
    with pytest.raises(BadInput, match=f"fp16 codec carries FP32 tensors, not {datatype}"):
        encode_request(request({"a": array_of(datatype, (2, 2))}), "fp16")


@pytest.mark.parametrize("datatype", FP16_REFUSES)
def test_fp16_refuses_other_datatypes_on_decode(datatype: str) -> None:
    body = tensor_body(datatype, [2], b"\x00" * 8, codec="fp16")
    with pytest.raises(BadInput, match=f"fp16 codec carries FP32 tensors, not {datatype}"):
        decode_request(body)


@pytest.mark.parametrize("datatype", JPEG_REFUSES_DATATYPE)
def test_jpeg_refuses_other_datatypes(datatype: str) -> None:
    with pytest.raises(BadInput, match=f"jpeg codec carries UINT8 images.*not {datatype}"):
        encode_request(request({"a": array_of(datatype, (4, 4, 3))}), "jpeg")
    body = tensor_body(datatype, [4, 4, 3], b"\x00" * 8, codec="jpeg")
    with pytest.raises(BadInput, match=f"jpeg codec carries UINT8 images.*not {datatype}"):
        decode_request(body)


@pytest.mark.parametrize("shape", JPEG_REFUSES_SHAPE, ids=str)
def test_jpeg_refuses_other_shapes(shape: tuple[int, ...]) -> None:
    shown = re.escape(str(list(shape)))
    with pytest.raises(BadInput, match=f"jpeg codec carries UINT8 images.*{shown}"):
        encode_request(request({"a": array_of("UINT8", shape)}), "jpeg")
    with pytest.raises(BadInput, match=f"jpeg codec carries UINT8 images.*{shown}"):
        decode_request(tensor_body("UINT8", list(shape), b"\x00" * 8, codec="jpeg"))


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0, 1), (2, 0, 4, 3), (0, 0, 0, 3)], ids=str)
def test_jpeg_image_without_pixels_is_refused_or_round_trips(shape: tuple[int, ...]) -> None:
    """A JPEG cannot hold a 0-pixel image: the codec must say so (400), not crash, or cope."""
    array = np.zeros(shape, dtype=np.uint8)
    try:
        decoded = roundtrip({"a": array}, "jpeg")["a"]
    except BadInput:
        return
    assert decoded.shape == shape


def test_jpeg_image_beyond_jpeg_dimensions_is_bad_input() -> None:
    """JPEG stores at most 65500 pixels a side; a taller image is the caller's error (400)."""
    array = np.zeros((65501, 1, 1), dtype=np.uint8)
    with pytest.raises(BadInput):
        encode_request(request({"a": array}), "jpeg")


# ------------------------------------------------------------------- choosing the codecs


def test_codec_by_input_name_leaves_others_raw() -> None:
    a, b = values("FP32", (16, 16)), values("INT8", (5,))
    body = encode_request(request({"a": a, "b": b}), {"a": "zstd"})
    entries = {entry["name"]: entry for entry in header_of(body)["inputs"]}
    assert entries["a"]["parameters"]["codec"] == "zstd"
    assert "codec" not in entries["b"]["parameters"]
    assert entries["b"]["parameters"]["binary_data_size"] == 5
    decoded = decode_request(body).inputs
    assert_exact(decoded["a"], a)
    assert_exact(decoded["b"], b)


def test_mixed_codecs_in_one_request() -> None:
    image = smooth_image(32, 32, 3)
    inputs: dict[str, Array] = {
        "image": image,
        "features": values("FP32", (4, 8)),
        "mask": values("BOOL", (9,)),
        "ids": values("INT64", (3,)),
        "text": np.array(["alpha", "beta"]),
        "plain": values("UINT16", (2, 2)),
    }
    codecs: dict[str, str | Jpeg | Zstd] = {
        "image": Jpeg(quality=80),
        "features": "fp16",
        "mask": "lz4",
        "ids": Zstd(level=19),
        "text": "zstd",
    }
    body = encode_request(request(inputs), codecs)
    named = {e["name"]: e["parameters"].get("codec") for e in header_of(body)["inputs"]}
    assert named == {
        "image": "jpeg",
        "features": "fp16",
        "mask": "lz4",
        "ids": "zstd",
        "text": "zstd",
        "plain": None,
    }
    decoded = decode_request(body).inputs
    assert list(decoded) == list(inputs)
    assert mean_abs_error(decoded["image"], image) < 6
    np.testing.assert_allclose(decoded["features"], inputs["features"], rtol=1e-3)
    for name in ("mask", "ids", "plain"):
        assert_exact(decoded[name], inputs[name])
    assert decoded["text"].tolist() == [b"alpha", b"beta"]


@pytest.mark.parametrize("choice", ["nope", {"a": "nope"}, "ZSTD", ""], ids=repr)
def test_unknown_codec_name_on_encode_lists_the_known(choice: Choices) -> None:
    with pytest.raises(BadInput, match="unknown codec") as info:
        encode_request(request({"a": values("INT32", (2,))}), choice)
    assert "known: " + ", ".join(KNOWN_CODECS) in str(info.value)


def test_unknown_codec_name_on_decode_lists_the_known() -> None:
    body = tensor_body("INT32", [2], b"\x00" * 8, codec="brotli")
    with pytest.raises(BadInput, match=r"inputs\[0\] \(a\): unknown codec 'brotli'") as info:
        decode_request(body)
    assert "known: " + ", ".join(KNOWN_CODECS) in str(info.value)


@pytest.mark.parametrize("codec", [3, None, ["zstd"], {"name": "zstd"}], ids=repr)
def test_codec_parameter_must_be_a_string(codec: object) -> None:
    entry = {
        "name": "a",
        "datatype": "INT32",
        "shape": [2],
        "parameters": {"binary_data_size": 8, "codec": codec},
    }
    with pytest.raises(BadInput, match="codec"):
        decode_request(frame({"inputs": [entry]}, b"\x00" * 8))


@pytest.mark.parametrize("reply_codec", KNOWN_CODECS)
def test_reply_codec_travels_in_parameters(reply_codec: str) -> None:
    body = encode_request(request({"a": values("INT8", (2,))}, reply_codec=reply_codec))
    assert header_of(body)["parameters"]["reply_codec"] == reply_codec
    assert decode_request(body).reply_codec == reply_codec


def test_no_reply_codec_means_none() -> None:
    body = encode_request(request({"a": values("INT8", (2,))}))
    assert "parameters" not in header_of(body)
    assert decode_request(body).reply_codec is None


@pytest.mark.parametrize("reply_codec", ["brotli", "", 7, ["zstd"], {"a": 1}, True], ids=repr)
def test_unknown_reply_codec_is_bad_input_on_decode(reply_codec: object) -> None:
    body = frame({"id": "x", "parameters": {"reply_codec": reply_codec}, "inputs": []})
    with pytest.raises(BadInput, match="codec"):
        decode_request(body)


def test_unknown_reply_codec_is_bad_input_on_encode() -> None:
    with pytest.raises(BadInput, match="unknown codec 'brotli'; known: fp16, jpeg"):
        encode_request(request({}, reply_codec="brotli"))


# ------------------------------------------------------------------ limits: 413 and alloc


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_bytes_bomb_beyond_limit_fails_fast(codec: str) -> None:
    """64 MiB of zeros in a few KiB: refused (413) without decompressing it all."""
    bomb = zeros_64mib(codec)
    assert len(bomb) < MIB
    body = tensor_body("BYTES", [1], bomb, codec=codec)
    with traced_peak() as peak, pytest.raises(PayloadTooLarge):
        decode_request(body, limit=MIB)
    assert peak[0] < 8 * MIB


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_numeric_bomb_fails_fast(codec: str) -> None:
    """A small shape but 64 MiB of data behind it: refused without decompressing it all."""
    body = tensor_body("UINT8", [1024], zeros_64mib(codec), codec=codec)
    with traced_peak() as peak, pytest.raises((BadInput, PayloadTooLarge)):
        decode_request(body, limit=MIB)
    assert peak[0] < 8 * MIB


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_frames_without_a_stored_size_are_refused_unread(codec: str) -> None:
    """Streaming compressors may omit the content size; the protocol requires it, so that
    the size is checked against the limit before anything is decompressed."""
    plain = bytes_layout([b"q" * (2 * MIB)])
    body = tensor_body("BYTES", [1], compress(codec, plain, store_size=False), codec=codec)
    with traced_peak() as peak, pytest.raises(BadInput, match="must declare their content size"):
        decode_request(body, limit=MIB)
    assert peak[0] < 8 * MIB


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_bytes_beyond_limit_with_stored_size_is_payload_too_large(codec: str) -> None:
    plain = bytes_layout([b"q" * (2 * MIB)])
    body = tensor_body("BYTES", [1], compress(codec, plain), codec=codec)
    with traced_peak() as peak, pytest.raises(PayloadTooLarge):
        decode_request(body, limit=MIB)
    assert peak[0] < 8 * MIB


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_small_bytes_tensor_does_not_allocate_the_whole_limit(codec: str) -> None:
    """The limit is a ceiling, not a buffer size: a 20-byte tensor costs about 20 bytes."""
    elements = [b"hello", b"world"]
    body = tensor_body("BYTES", [2], compress(codec, bytes_layout(elements)), codec=codec)
    with traced_peak() as peak:
        decoded = decode_request(body, limit=256 * MIB).inputs["a"]
    assert decoded.tolist() == elements
    assert peak[0] < 16 * MIB


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_bytes_within_limit_decode(codec: str) -> None:
    elements = [b"q" * (MIB // 2), b"r" * 1000]
    body = tensor_body("BYTES", [2], compress(codec, bytes_layout(elements)), codec=codec)
    assert decode_request(body, limit=MIB).inputs["a"].tolist() == elements
    with pytest.raises(PayloadTooLarge):
        decode_request(body, limit=MIB // 4)


@pytest.mark.parametrize(
    ("codec", "datatype", "shape"),
    [
        ("zstd", "FP32", [1 << 18, 2]),
        ("lz4", "INT64", [1 << 17, 2]),
        ("fp16", "FP32", [512, 1024]),
        ("jpeg", "UINT8", [1024, 1024, 3]),
        ("jpeg", "UINT8", [2, 512, 512, 3]),
        ("zstd", "UINT8", [1 << 40]),
    ],
    ids=str,
)
def test_declared_shape_beyond_limit_is_payload_too_large(
    codec: str, datatype: str, shape: list[int]
) -> None:
    body = tensor_body(datatype, shape, b"\x00" * 64, codec=codec)  # the data is never read
    with traced_peak() as peak, pytest.raises(PayloadTooLarge, match="exceeds the limit"):
        decode_request(body, limit=MIB)
    assert peak[0] < MIB


def test_codec_tensors_share_one_budget() -> None:
    inputs = {"a": np.zeros(160_000, np.float32), "b": np.zeros(160_000, np.float32)}  # 625 KiB
    body = encode_request(request(inputs), "zstd")
    with pytest.raises(PayloadTooLarge):
        decode_request(body, limit=MIB)
    decoded = decode_request(body, limit=2 * MIB).inputs
    assert_exact(decoded["b"], inputs["b"])


def test_raw_tensors_do_not_count_against_the_limit() -> None:
    """Raw numeric tensors are views of the body: nothing is allocated for them."""
    array = values("FP64", (256, 256))  # 512 KiB
    decoded = decode_request(encode_request(request({"a": array})), limit=1024).inputs["a"]
    assert_exact(decoded, array)


def test_responses_respect_the_limit_too() -> None:
    outputs = {"y": np.zeros(1 << 18, np.int64)}  # 2 MiB
    body = encode_response(
        InferResponse(id="r", model_name="m", model_version="1", outputs=outputs), "lz4"
    )
    with pytest.raises(PayloadTooLarge):
        decode_response(body, limit=MIB)
    assert_exact(decode_response(body, limit=4 * MIB).outputs["y"], outputs["y"])


# ---------------------------------------------------------------- corrupt codec data: 400s

INT32_PLAIN = np.arange(64, dtype="<i4").tobytes()


def corruptions(codec: str) -> dict[str, bytes]:
    good = compress(codec, INT32_PLAIN)
    return {
        "garbage": b"this is not compressed data at all",
        "empty": b"",
        "bad-magic": bytes([good[0] ^ 0xFF]) + good[1:],
        "truncated-header": good[:3],
        "truncated-body": good[: len(good) - 4],
    }


CORRUPTIONS = [
    pytest.param(codec, data, id=f"{codec}-{label}")
    for codec in ("zstd", "lz4")
    for label, data in corruptions(codec).items()
]


@pytest.mark.parametrize(("codec", "data"), CORRUPTIONS)
def test_corrupt_compressed_data_is_bad_input(codec: str, data: bytes) -> None:
    with pytest.raises(BadInput):
        decode_request(tensor_body("INT32", [64], data, codec=codec))
    with pytest.raises(BadInput):
        decode_request(tensor_body("BYTES", [1], data, codec=codec))


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_bytes_after_the_compressed_frame_are_bad_input(codec: str) -> None:
    """Like jpeg and BYTES, a compressed tensor may not carry bytes its frame does not use."""
    data = compress(codec, INT32_PLAIN) + b"trailing garbage"
    with pytest.raises(BadInput):
        decode_request(tensor_body("INT32", [64], data, codec=codec))


@pytest.mark.parametrize("store_size", [True, False], ids=["sized", "unsized"])
@pytest.mark.parametrize("codec", ["zstd", "lz4"])
@pytest.mark.parametrize("elements", [63, 65, 80, 1], ids=lambda n: f"shape-{n}")
def test_decompressed_size_must_match_shape(codec: str, store_size: bool, elements: int) -> None:
    """64 INT32 values (256 bytes) decompressed for a shape that needs a different size: 400,
    whichever side of the shape it falls and however far below the limit it is."""
    data = compress(codec, INT32_PLAIN, store_size=store_size)
    with pytest.raises(BadInput):
        decode_request(tensor_body("INT32", [elements], data, codec=codec))


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressed_bool_holding_other_bytes_is_bad_input(codec: str) -> None:
    data = compress(codec, bytes([0, 1, 2, 1]))
    with pytest.raises(BadInput, match="BOOL"):
        decode_request(tensor_body("BOOL", [4], data, codec=codec))


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressed_bytes_layout_errors_are_bad_input(codec: str) -> None:
    good = bytes_layout([b"abc", b"de"])
    for plain in (good[:-1], good + b"x", good[:2], struct.pack("<I", 1 << 30) + b"abc"):
        with pytest.raises(BadInput, match="BYTES"):
            decode_request(tensor_body("BYTES", [2], compress(codec, plain), codec=codec))


def test_fp16_data_of_the_wrong_length_is_bad_input() -> None:
    for data in (b"", b"\x00" * 7, b"\x00" * 16):
        with pytest.raises(BadInput, match="fp16 tensor of shape \\[4\\] needs 8 bytes"):
            decode_request(tensor_body("FP32", [4], data, codec="fp16"))


def jpeg_data(images: Array) -> bytes:
    return data_of(encode_request(request({"a": images}), "jpeg"))


def jpeg_parts(data: bytes) -> list[bytes]:
    parts, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        parts.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return parts


def with_lengths(parts: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(part)) + part for part in parts)


def corrupt_jpegs() -> dict[str, bytes]:
    (jpeg,) = jpeg_parts(jpeg_data(smooth_image(16, 16, 3)))
    return {
        "garbage": with_lengths([b"\x12" * len(jpeg)]),
        "bad-soi": with_lengths([b"\x00\x00" + jpeg[2:]]),
        "header-only": with_lengths([jpeg[:20]]),
        "empty-image": with_lengths([b""]),
    }


@pytest.mark.parametrize("label", ["garbage", "bad-soi", "header-only", "empty-image"])
def test_corrupt_jpeg_is_bad_input(label: str) -> None:
    data = corrupt_jpegs()[label]
    with pytest.raises(BadInput, match=r"(?i)jpeg"):
        decode_request(tensor_body("UINT8", [16, 16, 3], data, codec="jpeg"))


@pytest.mark.parametrize(
    "shape", [[16, 8, 3], [8, 16, 3], [32, 16, 3], [16, 17, 1], [1, 15, 16, 3]], ids=str
)
def test_jpeg_dimensions_must_match_the_shape(shape: list[int]) -> None:
    data = jpeg_data(smooth_image(16, 16, 3))
    with pytest.raises(BadInput, match="JPEG is 16x16"):
        decode_request(tensor_body("UINT8", shape, data, codec="jpeg"))


def truncated_jpeg_lists() -> dict[str, tuple[bytes, list[int]]]:
    batch = np.stack([smooth_image(16, 16, 3, phase=p) for p in (0.0, 1.0)])
    data = jpeg_data(batch)
    first, second = jpeg_parts(data)
    past_end = struct.pack("<I", 1 << 31) + first + with_lengths([second])
    return {
        "one-image-short": (with_lengths([first]), [2, 16, 16, 3]),
        "more-images-claimed": (data, [3, 16, 16, 3]),
        "cut-in-second": (data[:-10], [2, 16, 16, 3]),
        "cut-in-length": (data[: 4 + len(first) + 2], [2, 16, 16, 3]),
        "left-over": (data + b"\x00\x00", [2, 16, 16, 3]),
        "fewer-claimed": (data, [1, 16, 16, 3]),
        "length-past-end": (past_end, [2, 16, 16, 3]),
        "too-short-for-count": (b"\x00" * 7, [2, 16, 16, 3]),
    }


@pytest.mark.parametrize(
    "label",
    [
        "one-image-short",
        "more-images-claimed",
        "cut-in-second",
        "cut-in-length",
        "left-over",
        "fewer-claimed",
        "length-past-end",
        "too-short-for-count",
    ],
)
def test_truncated_or_padded_jpeg_list_is_bad_input(label: str) -> None:
    data, shape = truncated_jpeg_lists()[label]
    with pytest.raises(BadInput):
        decode_request(tensor_body("UINT8", shape, data, codec="jpeg"))


def test_greyscale_and_colour_jpegs_decode_into_either_channel_count() -> None:
    """The shape decides the channels: libjpeg converts, and the dimensions still match."""
    grey = jpeg_data(smooth_image(16, 16, 1))
    colour = decode_request(tensor_body("UINT8", [16, 16, 3], grey, codec="jpeg")).inputs["a"]
    assert colour.shape == (16, 16, 3)
