"""Property-based tests of the wire decoders: hostile bodies, allocation bounds, round trips.

Whatever bytes arrive, decode_request/decode_response either decode them or raise BadInput
(400) / PayloadTooLarge (413): never another exception, never a hang, and never an allocation
far beyond the body plus the ``limit`` they were given.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as nps
import numpy as np
import numpy.typing as npt
import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferbus.codecs import (
    DATATYPES,
    InferRequest,
    InferResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from inferbus.codecs.base import Choices
from inferbus.codecs.jpeg import Jpeg
from inferbus.errors import BadInput, PayloadTooLarge

Array = npt.NDArray[Any]
Decoded = InferRequest | InferResponse
Decoder = Callable[[bytes, int], Decoded]

MIB = 1 << 20
LIMIT = MIB  # the limit of the allocation-bound properties
FUZZ_LIMIT = 64 * MIB  # a realistic model limit for the other properties
KNOWN_CODECS = ["raw", "zstd", "lz4", "fp16", "jpeg"]


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------- helpers


def split(body: bytes) -> tuple[Any, bytes] | None:
    """The JSON header and the data of a well-framed body; None when it is not one."""
    if len(body) < 4:
        return None
    (length,) = struct.unpack_from("<I", body)
    if 4 + length > len(body):
        return None
    try:
        return orjson.loads(body[4 : 4 + length]), body[4 + length :]
    except orjson.JSONDecodeError:
        return None


def reframe(header: object, data: bytes) -> bytes:
    # The stdlib encoder: it writes integers of any size, which orjson would refuse to.
    text = json.dumps(header).encode()
    return struct.pack("<I", len(text)) + text + data


def tensors_of(decoded: Decoded) -> dict[str, Array]:
    return dict(decoded.inputs if isinstance(decoded, InferRequest) else decoded.outputs)


def decode_or_refuse(decode: Decoder, body: bytes, limit: int) -> None:
    """The property: a decode, or a 400/413. Any other exception fails the test."""
    try:
        decoded = decode(body, limit)
    except (BadInput, PayloadTooLarge):
        return
    for name, array in tensors_of(decoded).items():
        assert isinstance(name, str)
        assert isinstance(array, np.ndarray)


def traced_peak(call: Callable[[], object]) -> int:
    """The peak bytes allocated during ``call`` (numpy buffers included); errors ignored."""
    tracemalloc.start()
    try:
        call()
    except (BadInput, PayloadTooLarge):
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def image(height: int, width: int, channels: int, seed: int) -> Array:
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * (3 + k) + y * (5 + seed) + 40 * k) % 256 for k in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------- seed bodies


def seed_bodies() -> list[bytes]:
    """Real bodies with every codec, for the mutations to start from."""
    rng = np.random.default_rng(1)
    mixed: dict[str, Array] = {
        "raw_f32": rng.standard_normal((2, 3)).astype(np.float32),
        "zstd_i64": np.arange(4, dtype=np.int64),
        "lz4_bool": np.array([True, False, True, True, False]),
        "fp16_f32": rng.standard_normal((2, 2)).astype(np.float32),
        "jpeg_rgb": image(8, 8, 3, 0),
        "jpeg_grey_batch": np.stack([image(8, 8, 1, 1), image(8, 8, 1, 2)]),
        "raw_text": np.array(["ab", "", "cde"]),
        "zstd_text": np.array([b"x" * 9, b"\x00\x01"], dtype=object),
        "lz4_text": np.array(["héllo", "w"]),
        "zstd_empty": np.zeros((0, 3), dtype=np.uint8),
    }
    codecs: dict[str, str] = {
        "zstd_i64": "zstd",
        "lz4_bool": "lz4",
        "fp16_f32": "fp16",
        "jpeg_rgb": "jpeg",
        "jpeg_grey_batch": "jpeg",
        "zstd_text": "zstd",
        "lz4_text": "lz4",
        "zstd_empty": "zstd",
    }
    request = InferRequest(
        id="seed", inputs=mixed, outputs=("y", "z"), timeout_us=5_000_000, reply_codec="lz4"
    )
    response = InferResponse(id="seed", model_name="m", model_version="2", outputs=mixed)
    bodies = [encode_request(request, codecs), encode_response(response, codecs)]
    # One tensor each: a mutation then lands in a codec's data more often.
    for name, codec in [*codecs.items(), ("raw_f32", "raw"), ("raw_text", "raw")]:
        single = InferRequest(id="s", inputs={name: mixed[name]})
        bodies.append(encode_request(single, codec))
    bodies.append(encode_request(InferRequest(id="q", inputs={"big": image(32, 32, 3, 3)}), "jpeg"))
    return bodies


SEEDS = seed_bodies()


# ------------------------------------------------------------------------------ mutations

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "raw", "zstd", "lz4", "fp16", "jpeg", "UINT8", "BYTES", "x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner),
    max_leaves=6,
)
interesting_ints = st.sampled_from([-1, 0, 1, 2, 3, 7, 255, 65500, 2**31, 2**32, 2**48, 2**63])
dims = st.integers(-2, 70) | interesting_ints
datatypes = st.sampled_from([*sorted(DATATYPES), "FP8", "uint8", ""]) | json_values
codec_names = st.sampled_from([*KNOWN_CODECS, "nope", ""]) | json_values


def edit_entry(draw: st.DrawFn, entry: dict[str, Any]) -> None:
    parameters = entry.get("parameters")
    field = draw(
        st.sampled_from(
            ["shape", "dim", "size", "size-delta", "datatype", "codec", "name", "drop", "other"]
        )
    )
    if field == "shape":
        entry["shape"] = draw(st.lists(dims, max_size=5) | json_values)
    elif field == "dim" and isinstance(entry.get("shape"), list) and entry["shape"]:
        index = draw(st.integers(0, len(entry["shape"]) - 1))
        entry["shape"][index] = draw(dims)
    elif field in ("size", "size-delta", "codec") and isinstance(parameters, dict):
        if field == "size":
            parameters["binary_data_size"] = draw(interesting_ints | json_values)
        elif field == "size-delta" and isinstance(parameters.get("binary_data_size"), int):
            parameters["binary_data_size"] += draw(st.integers(-8, 8))
        else:
            parameters["codec"] = draw(codec_names)
    elif field == "datatype":
        entry["datatype"] = draw(datatypes)
    elif field == "name":
        entry["name"] = draw(st.sampled_from(["", "raw_f32", "zstd_i64"]) | json_values)
    elif field == "drop" and entry:
        del entry[draw(st.sampled_from(sorted(entry)))]
    else:
        entry[draw(st.sampled_from(["parameters", "data", "extra"]))] = draw(json_values)


def edit_top(draw: st.DrawFn, header: dict[str, Any]) -> None:
    field = draw(
        st.sampled_from(["reply_codec", "timeout", "id", "inputs", "outputs", "swap", "dup"])
    )
    key = "inputs" if "inputs" in header else "outputs"
    entries = header.get(key)
    if field in ("reply_codec", "timeout"):
        parameters = header.setdefault("parameters", {})
        if isinstance(parameters, dict):
            parameters[field] = draw(codec_names if field == "reply_codec" else json_values)
    elif field in ("swap", "dup") and isinstance(entries, list) and len(entries) > 1:
        first, second = draw(st.permutations(range(len(entries))))[:2]
        if field == "swap":
            entries[first], entries[second] = entries[second], entries[first]
        else:
            entries[first] = entries[second]
    else:
        header[field] = draw(json_values)


def mutate_header(draw: st.DrawFn, body: bytes) -> bytes:
    parts = split(body)
    if parts is None or not isinstance(parts[0], dict):
        return body
    header, data = parts
    key = "inputs" if "inputs" in header else "outputs"
    entries = header.get(key)
    if isinstance(entries, list) and entries and draw(st.integers(0, 3)):
        entry = entries[draw(st.integers(0, len(entries) - 1))]
        if isinstance(entry, dict):
            edit_entry(draw, entry)
    else:
        edit_top(draw, header)
    if draw(st.booleans()):  # keep the data consistent with the sizes, or not
        data = data[: draw(st.integers(0, len(data)))]
    return reframe(header, data)


def flip(draw: st.DrawFn, body: bytes) -> bytes:
    if not body:
        return body
    parts = split(body)
    start = len(body) - len(parts[1]) if parts is not None and draw(st.booleans()) else 0
    if start >= len(body):
        start = 0
    mutable = bytearray(body)
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(start, len(body) - 1))
        mutable[position] ^= draw(st.integers(1, 255))
    return bytes(mutable)


def truncate(draw: st.DrawFn, body: bytes) -> bytes:
    return body[: draw(st.integers(0, len(body)))]


def insert(draw: st.DrawFn, body: bytes) -> bytes:
    position = draw(st.integers(0, len(body)))
    return body[:position] + draw(st.binary(min_size=1, max_size=16)) + body[position:]


def delete(draw: st.DrawFn, body: bytes) -> bytes:
    start = draw(st.integers(0, len(body)))
    return body[:start] + body[start + draw(st.integers(1, 16)) :]


def scramble_data(draw: st.DrawFn, body: bytes) -> bytes:
    """Random bytes in place of part of the tensor data; the framing stays valid."""
    parts = split(body)
    if parts is None or not parts[1]:
        return body
    data = parts[1]
    start = draw(st.integers(0, len(data) - 1))
    end = draw(st.integers(start + 1, len(data)))
    noise = draw(st.binary(min_size=end - start, max_size=end - start))
    return body[: len(body) - len(data)] + data[:start] + noise + data[end:]


MUTATIONS = [mutate_header, mutate_header, flip, truncate, insert, delete, scramble_data]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    body = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        body = draw(st.sampled_from(MUTATIONS))(draw, body)
    return body


SIZES = {"UINT8": 1, "BOOL": 1, "INT16": 2, "FP16": 2, "INT32": 4, "FP32": 4, "FP64": 8}


@st.composite
def structured_bodies(draw: st.DrawFn) -> bytes:
    """Well-framed bodies with plausible headers and random tensor data."""
    entries: list[dict[str, Any]] = []
    data = b""
    for index in range(draw(st.integers(0, 3))):
        datatype = draw(st.sampled_from([*SIZES, "UINT8", "BYTES"]))
        codec = draw(st.sampled_from(KNOWN_CODECS))
        shape = draw(st.lists(st.integers(0, 9) | interesting_ints, max_size=4))
        chunk = draw(st.binary(max_size=64))
        if codec == "raw" and datatype in SIZES and draw(st.booleans()):
            shape = [max(0, min(d, 9)) for d in shape]
            count = int(np.prod(shape))
            chunk = draw(
                st.binary(min_size=count * SIZES[datatype], max_size=count * SIZES[datatype])
            )
        elif codec == "zstd" and draw(st.booleans()):
            chunk = zstandard.ZstdCompressor().compress(chunk)
        parameters: dict[str, Any] = {"binary_data_size": len(chunk), "codec": codec}
        entries.append(
            {"name": f"t{index}", "datatype": datatype, "shape": shape, "parameters": parameters}
        )
        data += chunk
    header: dict[str, Any] = {"id": "s", "inputs": entries, "outputs": entries}
    return reframe(header, data)


DECODERS: list[Decoder] = [decode_request, decode_response]
decoders = st.sampled_from(DECODERS)


# --------------------------------------------------------------------- hostile bodies


@fuzz_settings(400)
@given(decode=decoders, body=st.binary(max_size=256))
def test_random_bytes_decode_or_are_refused(decode: Decoder, body: bytes) -> None:
    decode_or_refuse(decode, body, 1 << 30)


@fuzz_settings(200)
@given(decode=decoders, length=st.integers(0, 300), rest=st.binary(max_size=300))
def test_random_bytes_behind_a_plausible_prefix(decode: Decoder, length: int, rest: bytes) -> None:
    decode_or_refuse(decode, struct.pack("<I", length) + rest, FUZZ_LIMIT)


@fuzz_settings(300)
@given(decode=decoders, body=structured_bodies())
def test_plausible_headers_with_random_data(decode: Decoder, body: bytes) -> None:
    decode_or_refuse(decode, body, FUZZ_LIMIT)


@fuzz_settings(600)
@given(decode=decoders, body=mutated_bodies())
def test_mutated_bodies_decode_or_are_refused(decode: Decoder, body: bytes) -> None:
    decode_or_refuse(decode, body, FUZZ_LIMIT)


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_seed_bodies_decode(index: int) -> None:
    """The mutations start from valid bodies: each decodes as what it is."""
    body = SEEDS[index]
    decoder: Decoder = decode_response if index == 1 else decode_request
    assert tensors_of(decoder(body, FUZZ_LIMIT))


# ------------------------------------------------------------------- allocation bound


def assert_allocation_bounded(body: bytes) -> None:
    peak = traced_peak(lambda: decode_request(body, LIMIT))
    assert peak < len(body) + LIMIT + MIB, f"peak {peak} for a body of {len(body)} bytes"


@fuzz_settings(250)
@given(body=mutated_bodies() | structured_bodies())
def test_decoding_allocates_at_most_body_plus_limit(body: bytes) -> None:
    assert_allocation_bounded(body)


def many_small_elements(codec: str) -> bytes:
    elements = np.array([b"ab"] * 170_000, dtype=object)  # 1 MiB of BYTES layout
    return encode_request(InferRequest(id="b", inputs={"a": elements}), codec)


@pytest.mark.parametrize("codec", ["raw", "zstd", "lz4"])
def test_many_small_bytes_elements_stay_within_the_allocation_bound(codec: str) -> None:
    """Every element of a BYTES tensor is a Python object, larger than its 6 wire bytes:
    the limit must account for them, or refuse (413)."""
    assert_allocation_bounded(many_small_elements(codec))


def test_bomb_bodies_stay_within_the_allocation_bound() -> None:
    zeros = zstandard.ZstdCompressor().compress(bytes(32 * MIB))
    for datatype, shape in [("BYTES", [1]), ("UINT8", [32 * MIB]), ("UINT8", [MIB])]:
        parameters = {"binary_data_size": len(zeros), "codec": "zstd"}
        entry = {"name": "a", "datatype": datatype, "shape": shape, "parameters": parameters}
        assert_allocation_bounded(reframe({"inputs": [entry]}, zeros))


# ------------------------------------------------------------------------ round trips

NUMERIC_DTYPES = [
    np.dtype(name)
    for name in ["?", "u1", "<u2", "<u4", "<u8", "i1", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8"]
]
FOREIGN_ORDER = [np.dtype(name) for name in [">u2", ">i4", ">i8", ">f2", ">f4", ">f8"]]
shapes = nps.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
numeric_arrays = st.sampled_from(NUMERIC_DTYPES + FOREIGN_ORDER).flatmap(
    lambda dtype: nps.arrays(dtype, shapes)
)
bytes_elements = st.binary(max_size=12) | st.sampled_from(["", "a", "héllo", "日本", "\x00z"])
bytes_arrays = shapes.flatmap(
    lambda shape: nps.arrays(np.dtype(object), shape, elements=bytes_elements, fill=st.nothing())
)
lossless = st.sampled_from(["raw", "zstd", "lz4"])


def expected_bytes(array: Array) -> list[bytes]:
    return [e.encode() if isinstance(e, str) else e for e in array.ravel().tolist()]


@fuzz_settings(300)
@given(
    arrays=st.dictionaries(st.sampled_from("abcd"), numeric_arrays, max_size=3),
    codec=lossless,
    per_name=st.booleans(),
)
def test_lossless_round_trip_of_numeric_arrays(
    arrays: dict[str, Array], codec: str, per_name: bool
) -> None:
    choice: Choices = {name: codec for name in arrays} if per_name else codec
    body = encode_request(InferRequest(id="p", inputs=arrays), choice)
    decoded = decode_request(body).inputs
    assert list(decoded) == list(arrays)
    for name, original in arrays.items():
        got = decoded[name]
        assert got.shape == original.shape
        assert got.dtype == original.dtype.newbyteorder("<")
        np.testing.assert_array_equal(got, original)  # NaN equals NaN here
        little = np.ascontiguousarray(original, dtype=original.dtype.newbyteorder("<"))
        assert got.tobytes() == little.tobytes()  # bit-exact: -0.0 and NaN payloads kept


@fuzz_settings(150)
@given(array=bytes_arrays, codec=lossless)
def test_lossless_round_trip_of_bytes_arrays(array: Array, codec: str) -> None:
    body = encode_request(InferRequest(id="p", inputs={"t": array}), codec)
    got = decode_request(body).inputs["t"]
    assert got.shape == array.shape
    assert got.ravel().tolist() == expected_bytes(array)


@fuzz_settings(150)
@given(
    array=nps.arrays(
        np.float32,
        shapes,
        elements=st.floats(-65504, 65504, width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_fp16_round_trip_within_half_precision(array: Array) -> None:
    body = encode_request(InferRequest(id="p", inputs={"x": array}), "fp16")
    got = decode_request(body).inputs["x"]
    assert got.shape == array.shape
    assert got.dtype == np.float32
    # 11 significant bits for normal values; subnormal steps of 2**-24 below 2**-14.
    np.testing.assert_allclose(got, array, rtol=2.0**-11, atol=2.0**-25)


@fuzz_settings(40)
@given(
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    channels=st.sampled_from([1, 3]),
    batch=st.none() | st.integers(0, 3),
    quality=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_jpeg_round_trip_keeps_shape(
    height: int, width: int, channels: int, batch: int | None, quality: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if batch is None else (batch, height, width, channels)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    body = encode_request(InferRequest(id="p", inputs={"img": array}), Jpeg(quality=quality))
    got = decode_request(body, MIB).inputs["img"]
    assert got.shape == shape
    assert got.dtype == np.uint8
