"""Unit tests for inferbus.codecs (the wire framing and the raw codec) and tensor signatures."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from inferbus.codecs import (
    BYTES,
    DATATYPES,
    InferRequest,
    InferResponse,
    datatype_of,
    decode_error,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
    numpy_dtype,
)
from inferbus.contract import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    MAX_ERROR_TEXT,
    Signature,
    TensorSpec,
    error_reply,
)
from inferbus.errors import BadInput, ConfigError
from tests._datatypes import NUMERIC, random_array

Array = npt.NDArray[Any]
Decoder = Callable[[bytes], object]


SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "vector": (5,),
    "empty": (0,),
    "empty-inner": (2, 0, 3),
    "3d": (2, 3, 4),
}


# --------------------------------------------------------------------------------- helpers


def frame_raw(json_bytes: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<I", len(json_bytes)) + json_bytes + data


def frame(header: object, data: bytes = b"") -> bytes:
    # The stdlib encoder, so that tests can put integers beyond 64 bits in the header.
    return frame_raw(json.dumps(header).encode(), data)


def header_of(body: bytes) -> dict[str, Any]:
    (length,) = struct.unpack_from("<I", body)
    header = json.loads(body[4 : 4 + length])
    assert isinstance(header, dict)
    return header


def payload_of(body: bytes) -> bytes:
    (length,) = struct.unpack_from("<I", body)
    return body[4 + length :]


def entry(
    datatype: object = "FP32",
    shape: object = (2,),
    size: object = 8,
    name: object = "x",
    **extra: object,
) -> dict[str, object]:
    shape_value = list(shape) if isinstance(shape, tuple) else shape
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape_value,
        "parameters": {"binary_data_size": size},
        **extra,
    }


def owner_of(array: Array) -> object:
    """The object at the end of an array's ``base`` chain (what really holds its memory)."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        return base.obj
    return base


def round_trip_request(tensors: dict[str, Array]) -> dict[str, Array]:
    decoded = decode_request(encode_request(InferRequest(id="r", inputs=tensors)))
    return dict(decoded.inputs)


def round_trip_response(tensors: dict[str, Array]) -> dict[str, Array]:
    response = InferResponse(id="r", model_name="m", model_version="1", outputs=tensors)
    return dict(decode_response(encode_response(response)).outputs)


def encode_one_input(array: Array) -> bytes:
    return encode_request(InferRequest(id="", inputs={"x": array}))


def encode_one_output(array: Array) -> bytes:
    return encode_response(
        InferResponse(id="", model_name="", model_version="", outputs={"x": array})
    )


ROUND_TRIPS = pytest.mark.parametrize(
    "round_trip",
    [round_trip_request, round_trip_response],
    ids=["request", "response"],
)


# ------------------------------------------------------------------------------ datatypes


@pytest.mark.parametrize(("datatype", "dtype"), NUMERIC.items())
def test_numpy_dtype_is_little_endian(datatype: str, dtype: str) -> None:
    result = numpy_dtype(datatype)
    assert result == np.dtype(dtype)
    assert result is not None
    assert result.byteorder in "<|="


@pytest.mark.parametrize(("datatype", "dtype"), NUMERIC.items())
def test_datatype_of_numeric(datatype: str, dtype: str) -> None:
    assert datatype_of(np.zeros(2, dtype=dtype)) == datatype
    assert datatype_of(np.zeros(2, dtype=np.dtype(dtype).newbyteorder(">"))) == datatype


def test_datatypes_set() -> None:
    assert frozenset([*NUMERIC, "BYTES"]) == DATATYPES
    assert numpy_dtype(BYTES) is None


@pytest.mark.parametrize(
    "array",
    [np.array(["a"]), np.array([b"a"]), np.array(["a"], dtype=object)],
    ids=["str", "bytes", "object"],
)
def test_datatype_of_bytes(array: Array) -> None:
    assert datatype_of(array) == BYTES


@pytest.mark.parametrize("name", ["FP8", "fp32", "", "STRING", "BF16"])
def test_numpy_dtype_unknown(name: str) -> None:
    with pytest.raises(BadInput, match="unknown datatype"):
        numpy_dtype(name)


def test_float64_array_gives_fp64() -> None:
    body = encode_request(InferRequest(id="", inputs={"x": np.array([1.5, 2.5])}))
    assert header_of(body)["inputs"][0]["datatype"] == "FP64"


@pytest.mark.parametrize(
    "dtype",
    ["complex64", "complex128", "datetime64[s]", "timedelta64[s]", "V4", "longdouble"],
)
@pytest.mark.parametrize(
    "encode", [encode_one_input, encode_one_output], ids=["request", "response"]
)
def test_unsupported_dtype_rejected_on_encode(dtype: str, encode: Callable[[Array], bytes]) -> None:
    if dtype == "longdouble" and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is plain float64 on this platform")
    array = np.zeros(3, dtype=dtype)
    with pytest.raises(BadInput):
        encode(array)


def test_bytes_tensor_with_non_string_element_rejected() -> None:
    array = np.array(["ok", 3], dtype=object)
    with pytest.raises(BadInput, match="str or bytes"):
        encode_request(InferRequest(id="", inputs={"x": array}))


# ----------------------------------------------------------------------------- round trips


@ROUND_TRIPS
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("datatype", NUMERIC)
def test_numeric_round_trip(
    round_trip: Callable[[dict[str, Array]], dict[str, Array]],
    shape: tuple[int, ...],
    datatype: str,
) -> None:
    array = random_array(datatype, shape)
    result = round_trip({"t": array})
    assert list(result) == ["t"]
    decoded = result["t"]
    assert decoded.dtype == np.dtype(NUMERIC[datatype])
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array, strict=True)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("datatype", NUMERIC)
def test_numeric_wire_header(shape: tuple[int, ...], datatype: str) -> None:
    array = random_array(datatype, shape)
    body = encode_request(InferRequest(id="r", inputs={"t": array}))
    assert header_of(body)["inputs"] == [
        {
            "name": "t",
            "datatype": datatype,
            "shape": list(shape),
            "parameters": {"binary_data_size": array.nbytes},
        }
    ]
    assert payload_of(body) == array.astype(NUMERIC[datatype]).tobytes()


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_special_floats_round_trip_bit_exact(datatype: str) -> None:
    dtype = np.dtype(NUMERIC[datatype])
    array = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, np.finfo(dtype).tiny], dtype=dtype)
    decoded = round_trip_request({"f": array})["f"]
    unsigned = f"<u{dtype.itemsize}"
    np.testing.assert_array_equal(decoded.view(unsigned), array.view(unsigned))


def test_many_tensors_keep_order_and_layout() -> None:
    tensors: dict[str, Array] = {
        "b": np.arange(3, dtype="<i2"),
        "a": np.array([[True, False]]),
        "words": np.array(["hi", ""]),
        "c": np.linspace(0, 1, 4, dtype="<f8").reshape(2, 2),
    }
    body = encode_request(InferRequest(id="r", inputs=tensors))
    header = header_of(body)
    assert [e["name"] for e in header["inputs"]] == ["b", "a", "words", "c"]
    assert payload_of(body) == (
        tensors["b"].tobytes()
        + tensors["a"].tobytes()
        + struct.pack("<I", 2)
        + b"hi"
        + struct.pack("<I", 0)
        + tensors["c"].tobytes()
    )
    decoded = decode_request(body).inputs
    assert list(decoded) == ["b", "a", "words", "c"]
    for name in ("b", "a", "c"):
        np.testing.assert_array_equal(decoded[name], tensors[name], strict=True)
    assert decoded["words"].tolist() == [b"hi", b""]


def test_no_tensors_round_trip() -> None:
    body = encode_request(InferRequest(id="r", inputs={}))
    assert header_of(body)["inputs"] == []
    assert payload_of(body) == b""
    assert decode_request(body).inputs == {}


STRINGS: dict[str, Array] = {
    "scalar": np.array("héllo"),
    "vector": np.array(["a", "", "naïve", "日本語", "emoji 🚀"]),
    "empty": np.zeros((0,), dtype="U3"),
    "empty-inner": np.zeros((2, 0), dtype="U1"),
    "3d": np.array([["ab", "ç"], ["", "x" * 300], ["Ω", "z"]]).reshape(3, 2, 1),
    "object-str": np.array(["ü", "", "plain"], dtype=object),
}


@ROUND_TRIPS
@pytest.mark.parametrize("array", STRINGS.values(), ids=STRINGS.keys())
def test_bytes_round_trip_from_str(
    round_trip: Callable[[dict[str, Array]], dict[str, Array]], array: Array
) -> None:
    decoded = round_trip({"s": array})["s"]
    assert decoded.dtype == np.dtype(object)
    assert decoded.shape == array.shape
    expected = [str(value).encode("utf-8") for value in array.ravel().tolist()]
    assert decoded.ravel().tolist() == expected
    assert all(type(value) is bytes for value in decoded.ravel().tolist())


BYTE_ARRAYS: dict[str, Array] = {
    "object": np.array([b"\x00\xff", b"", b"abc", bytes(range(256))], dtype=object),
    "fixed": np.array([b"ab", b"c", b""]),
    "scalar": np.array(b"\x01\x02", dtype=object),
    "2d-mixed": np.array([[b"raw", "text"], ["", b"\x00"]], dtype=object),
}


@ROUND_TRIPS
@pytest.mark.parametrize("array", BYTE_ARRAYS.values(), ids=BYTE_ARRAYS.keys())
def test_bytes_round_trip_from_bytes(
    round_trip: Callable[[dict[str, Array]], dict[str, Array]], array: Array
) -> None:
    decoded = round_trip({"b": array})["b"]
    assert decoded.dtype == np.dtype(object)
    assert decoded.shape == array.shape
    expected = [v if isinstance(v, bytes) else v.encode() for v in array.ravel().tolist()]
    assert decoded.ravel().tolist() == expected


def test_bytes_wire_layout() -> None:
    body = encode_request(InferRequest(id="", inputs={"s": np.array(["ab", "é"])}))
    payload = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 2) + "é".encode()
    assert header_of(body)["inputs"] == [
        {
            "name": "s",
            "datatype": "BYTES",
            "shape": [2],
            "parameters": {"binary_data_size": len(payload)},
        }
    ]
    assert payload_of(body) == payload


# ------------------------------------------------------------------------------ zero copy


@pytest.mark.parametrize("datatype", NUMERIC)
def test_decoded_numeric_tensor_is_read_only_view_of_body(datatype: str) -> None:
    array = random_array(datatype, (3, 4))
    body = encode_request(InferRequest(id="", inputs={"first": np.array(["x"]), "second": array}))
    decoded = decode_request(body).inputs["second"]
    assert not decoded.flags.owndata
    assert not decoded.flags.writeable
    assert owner_of(decoded) is body
    with pytest.raises(ValueError, match="read-only"):
        decoded[0, 0] = decoded[0, 1]


def test_two_decodes_of_one_body_share_its_memory() -> None:
    body = encode_response(
        InferResponse(id="", model_name="m", model_version="1", outputs={"y": np.arange(8.0)})
    )
    first = decode_response(body).outputs["y"]
    second = decode_response(body).outputs["y"]
    assert owner_of(first) is body
    assert owner_of(second) is body
    assert np.shares_memory(first, second)


# ------------------------------------------------------------------- layouts and byte order


def _base_grid() -> Array:
    return np.arange(24, dtype="<f4").reshape(4, 6)


LAYOUTS: dict[str, Array] = {
    "strided": _base_grid()[:, ::2],
    "transposed": _base_grid().T,
    "reversed": _base_grid()[::-1, ::-1],
    "fortran": np.asfortranarray(_base_grid()),
    "big-endian-f4": _base_grid().astype(">f4"),
    "big-endian-i8": np.arange(-5, 5, dtype=">i8").reshape(2, 5),
    "big-endian-u2-strided": np.arange(20, dtype=">u2")[::3],
    "big-endian-f8-scalar": np.array(-2.5, dtype=">f8"),
    "broadcast": np.broadcast_to(np.arange(3, dtype="<i4"), (4, 3)),
}


@ROUND_TRIPS
@pytest.mark.parametrize("array", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_non_contiguous_and_big_endian_encode(
    round_trip: Callable[[dict[str, Array]], dict[str, Array]], array: Array
) -> None:
    decoded = round_trip({"t": array})["t"]
    little = array.dtype.newbyteorder("<")
    assert decoded.dtype == little
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("array", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_non_contiguous_and_big_endian_wire_bytes(array: Array) -> None:
    body = encode_request(InferRequest(id="", inputs={"t": array}))
    expected = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    assert payload_of(body) == expected
    assert header_of(body)["inputs"][0]["parameters"]["binary_data_size"] == len(expected)


# ---------------------------------------------------------------------------- request fields


@pytest.mark.parametrize("request_id", ["", "abc", "ünïcode-id", "x" * 1000])
@pytest.mark.parametrize("timeout_us", [None, 0, 1, 2_500_000, 2**63 - 1])
@pytest.mark.parametrize("outputs", [(), ("y",), ("y", "z")])
def test_request_fields_round_trip(
    request_id: str, timeout_us: int | None, outputs: tuple[str, ...]
) -> None:
    request = InferRequest(
        id=request_id, inputs={"x": np.ones(2, "<f4")}, outputs=outputs, timeout_us=timeout_us
    )
    body = encode_request(request)
    header = header_of(body)
    assert header["id"] == request_id
    if timeout_us is None:
        assert "timeout" not in header.get("parameters", {})
    else:
        assert header["parameters"]["timeout"] == timeout_us
    if outputs:
        assert header["outputs"] == [{"name": name} for name in outputs]
    else:
        assert "outputs" not in header
    decoded = decode_request(body)
    assert decoded.id == request_id
    assert decoded.timeout_us == timeout_us
    assert decoded.outputs == outputs
    np.testing.assert_array_equal(decoded.inputs["x"], np.ones(2, "<f4"), strict=True)


def test_decode_request_defaults() -> None:
    decoded = decode_request(frame({"inputs": []}))
    assert decoded.id == ""
    assert decoded.outputs == ()
    assert decoded.timeout_us is None
    assert decoded.inputs == {}


@pytest.mark.parametrize("timeout_us", [-1, -(2**40)])
def test_negative_timeout_rejected_by_request(timeout_us: int) -> None:
    with pytest.raises(BadInput, match="negative"):
        InferRequest(id="", inputs={}, timeout_us=timeout_us)


@pytest.mark.parametrize("timeout", [-1, 1.5, "10", True, [1], {"us": 1}])
def test_bad_timeout_rejected_by_decode(timeout: object) -> None:
    with pytest.raises(BadInput, match="timeout"):
        decode_request(frame({"inputs": [], "parameters": {"timeout": timeout}}))


def test_response_fields_round_trip() -> None:
    response = InferResponse(id="7", model_name="digits", model_version="3", outputs={})
    decoded = decode_response(encode_response(response))
    assert decoded == InferResponse(id="7", model_name="digits", model_version="3", outputs={})


# ------------------------------------------------------------------------- malformed bodies

FP32_PAIR = np.array([1.0, 2.0], dtype="<f4").tobytes()


def bytes_element(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _tensor_cases(key: str) -> dict[str, bytes]:
    """Bodies whose tensor list (under ``key``) is wrong; each must raise BadInput."""

    def body(entries: object, data: bytes = b"", **extra: object) -> bytes:
        return frame({key: entries, **extra}, data)

    return {
        "missing-tensors": frame({"id": "x"}),
        "tensors-object": body({"x": entry()}, FP32_PAIR),
        "tensors-null": body(None),
        "tensors-string": body("x"),
        "entry-number": body([1]),
        "entry-list": body([["x"]]),
        "missing-name": body([{k: v for k, v in entry().items() if k != "name"}], FP32_PAIR),
        "empty-name": body([entry(name="")], FP32_PAIR),
        "name-not-string": body([entry(name=3)], FP32_PAIR),
        "unknown-datatype": body([entry(datatype="FP8")], FP32_PAIR),
        "lowercase-datatype": body([entry(datatype="fp32")], FP32_PAIR),
        "datatype-not-string": body([entry(datatype=["FP32"])], FP32_PAIR),
        "datatype-object": body([entry(datatype={"FP32": 1})], FP32_PAIR),
        "datatype-number": body([entry(datatype=32)], FP32_PAIR),
        "datatype-null": body([entry(datatype=None)], FP32_PAIR),
        "missing-shape": body([{k: v for k, v in entry().items() if k != "shape"}], FP32_PAIR),
        "shape-not-list": body([entry(shape=2)], FP32_PAIR),
        "shape-string": body([entry(shape="[2]")], FP32_PAIR),
        "shape-object": body([entry(shape={"0": 2})], FP32_PAIR),
        "negative-dim": body([entry(shape=[-1])], FP32_PAIR),
        "negative-dim-zero-size": body([entry(shape=[-2, 0], size=0)]),
        "float-dim": body([entry(shape=[2.0])], FP32_PAIR),
        "bool-dim": body([entry(shape=[True, True])], FP32_PAIR),
        "string-dim": body([entry(shape=["2"])], FP32_PAIR),
        "null-dim": body([entry(shape=[None])], FP32_PAIR),
        "rank-33": body([entry(shape=[1] * 33, size=4)], FP32_PAIR[:4]),
        "missing-parameters": body(
            [{k: v for k, v in entry().items() if k != "parameters"}], FP32_PAIR
        ),
        "parameters-not-object": body([entry(parameters=[8])], FP32_PAIR),
        "size-missing": body([entry(parameters={})], FP32_PAIR),
        "size-negative": body([entry(size=-8)], FP32_PAIR),
        "size-float": body([entry(size=8.0)], FP32_PAIR),
        "size-string": body([entry(size="8")], FP32_PAIR),
        "size-bool": body([entry(shape=[1], size=True)], b"\x01"),
        "size-null": body([entry(size=None)], FP32_PAIR),
        "truncated-body": body([entry()], FP32_PAIR[:5]),
        "truncated-second-tensor": body(
            [entry(name="a"), entry(name="b")], FP32_PAIR + FP32_PAIR[:4]
        ),
        "trailing-bytes": body([entry()], FP32_PAIR + b"\x00\x00\x00\x00"),
        "data-without-tensors": body([], b"\x00"),
        "size-not-shape-times-itemsize": body([entry(shape=[3])], FP32_PAIR),
        "size-not-multiple-of-itemsize": body([entry(shape=[2], size=7)], FP32_PAIR[:7]),
        "fp64-size-mismatch": body([entry(datatype="FP64", shape=[2])], FP32_PAIR),
        "scalar-size-mismatch": body([entry(shape=[])], FP32_PAIR),
        "empty-shape-nonzero-size": body([entry(shape=[0, 4])], FP32_PAIR),
        "duplicate-names": body([entry(), entry()], FP32_PAIR + FP32_PAIR),
        "duplicate-names-bytes": body(
            [entry("BYTES", (1,), 5), entry("BYTES", (1,), 5)],
            bytes_element(b"a") + bytes_element(b"b"),
        ),
        "unknown-codec": body(
            [entry(parameters={"binary_data_size": 8, "codec": "zstd"})], FP32_PAIR
        ),
        "codec-null": body([entry(parameters={"binary_data_size": 8, "codec": None})], FP32_PAIR),
        "json-data-field": body([entry(data=[1.0, 2.0])], FP32_PAIR),
        "json-data-only": body(
            [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]
        ),
        "bytes-count-too-large": body([entry("BYTES", (3,), 8)], bytes_element(b"abcd")),
        "bytes-huge-count": body([entry("BYTES", (2**31, 2**31), 8)], bytes_element(b"abcd")),
        "bytes-element-past-end": body([entry("BYTES", (1,), 7)], struct.pack("<I", 10) + b"abc"),
        "bytes-element-length-max": body(
            [entry("BYTES", (1,), 7)], struct.pack("<I", 2**32 - 1) + b"abc"
        ),
        "bytes-truncated-length": body([entry("BYTES", (2,), 8)], bytes_element(b"abcd")),
        "bytes-leftover": body([entry("BYTES", (1,), 7)], bytes_element(b"a") + b"zz"),
        "bytes-scalar-leftover": body([entry("BYTES", (), 9)], bytes_element(b"a") * 2 + b"!"),
        "bytes-empty-with-data": body([entry("BYTES", (0,), 4)], b"\x00\x00\x00\x00"),
        "huge-shape": body([entry(shape=[2**40, 2**40], size=8)], FP32_PAIR),
        "huge-shape-bytes": body([entry("BYTES", [2**40, 2**40], 8)], FP32_PAIR),
        "huge-shape-rank": body([entry(shape=[2**16] * 8, size=8)], FP32_PAIR),
        "dim-beyond-64-bits": body([entry(shape=[2**70], size=8)], FP32_PAIR),
        "shape-product-huge-matching-nothing": body(
            [entry(shape=[2**31, 2**31], size=8)], FP32_PAIR
        ),
        "id-not-string": body([entry()], FP32_PAIR, id=7),
        "id-null": body([entry()], FP32_PAIR, id=None),
    }


FRAMING_CASES: dict[str, bytes] = {
    "empty": b"",
    "one-byte": b"\x00",
    "three-bytes": b"\x01\x00\x00",
    "prefix-only-zero": b"\x00\x00\x00\x00",
    "prefix-past-end": struct.pack("<I", 100) + b"{}",
    "prefix-max": struct.pack("<I", 2**32 - 1) + b"{}",
    "not-json": frame_raw(b"{not json"),
    "truncated-json": frame_raw(b'{"inputs": ['),
    "invalid-utf8-json": frame_raw(b'{"id": "\xff\xfe", "inputs": []}'),
    "json-list": frame_raw(b"[]"),
    "json-string": frame_raw(b'"inputs"'),
    "json-number": frame_raw(b"42"),
    "json-null": frame_raw(b"null"),
    "deeply-nested-json": frame_raw(b"[" * 100_000 + b"]" * 100_000),
    "text-body": b"this is not a framed body at all",
}

REQUEST_ONLY_CASES: dict[str, bytes] = {
    "parameters-not-object": frame({"inputs": [], "parameters": [1]}),
    "requested-outputs-not-list": frame({"inputs": [], "outputs": "y"}),
    "requested-output-not-object": frame({"inputs": [], "outputs": ["y"]}),
    "requested-output-without-name": frame({"inputs": [], "outputs": [{}]}),
    "requested-output-empty-name": frame({"inputs": [], "outputs": [{"name": ""}]}),
    "requested-output-name-not-string": frame({"inputs": [], "outputs": [{"name": 1}]}),
}

REQUEST_CASES = {**FRAMING_CASES, **_tensor_cases("inputs"), **REQUEST_ONLY_CASES}
RESPONSE_CASES = {**FRAMING_CASES, **_tensor_cases("outputs")}


@pytest.mark.parametrize("body", REQUEST_CASES.values(), ids=REQUEST_CASES.keys())
def test_malformed_request_raises_bad_input(body: bytes) -> None:
    with pytest.raises(BadInput):
        decode_request(body)


@pytest.mark.parametrize("body", RESPONSE_CASES.values(), ids=RESPONSE_CASES.keys())
def test_malformed_response_raises_bad_input(body: bytes) -> None:
    with pytest.raises(BadInput):
        decode_response(body)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "shorter than its 4-byte length prefix"),
        (struct.pack("<I", 100) + b"{}", "runs past the end"),
        (frame_raw(b"{nope"), "not valid JSON"),
        (frame_raw(b"[]"), "must be an object"),
        (frame({}), "'inputs' must be a list"),
        (frame({"inputs": [entry(datatype="FP8")]}, FP32_PAIR), "unknown datatype"),
        (frame({"inputs": [entry(shape=[-1])]}, FP32_PAIR), "non-negative"),
        (frame({"inputs": [entry(size=-1)]}, FP32_PAIR), "binary_data_size"),
        (frame({"inputs": [entry()]}, FP32_PAIR[:4]), "declare 8 bytes"),
        (frame({"inputs": [entry(), entry()]}, FP32_PAIR * 2), "appears twice"),
        (frame({"inputs": [entry(data=[1])]}, FP32_PAIR), "JSON tensor data"),
        (
            frame({"inputs": [entry(parameters={"binary_data_size": 8, "codec": "brotli"})]}),
            "unknown codec",
        ),
        (frame({"inputs": [entry(shape=[2**40, 2**40])]}, FP32_PAIR), "absurdly large"),
    ],
)
def test_malformed_request_messages(body: bytes, fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment):
        decode_request(body)


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "FP32", "FP64", "BYTES"])
@pytest.mark.parametrize(
    "shape", [[0, 2**62], [2**62, 0], [0, 2**63 - 1], [0, 2**40, 2**40]], ids=str
)
@pytest.mark.parametrize("decode", [decode_request, decode_response], ids=["request", "response"])
def test_zero_size_shape_with_huge_dimension_raises_bad_input(
    datatype: str, shape: list[int], decode: Decoder
) -> None:
    """No elements, so no bytes, but numpy cannot hold such a shape: BadInput, not ValueError."""
    key = "inputs" if decode is decode_request else "outputs"
    body = frame({key: [entry(datatype, shape, 0)]})
    with pytest.raises(BadInput):
        decode(body)


@pytest.mark.parametrize("decode", [decode_request, decode_response], ids=["request", "response"])
def test_random_garbage_never_escapes_bad_input(decode: Decoder) -> None:
    """Any exception other than BadInput escaping the decoder fails the test."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        body = rng.bytes(int(rng.integers(0, 128)))
        with contextlib.suppress(BadInput):
            decode(body)


def _valid_body(key: str) -> bytes:
    tensors: dict[str, Array] = {
        "f": np.arange(6, dtype="<f4").reshape(2, 3),
        "s": np.array(["ab", "", "çd"]),
        "b": np.array([True, False]),
        "i": np.array(-3, dtype="<i8"),
    }
    if key == "inputs":
        return encode_request(InferRequest(id="id", inputs=tensors, outputs=("y",), timeout_us=5))
    return encode_response(
        InferResponse(id="id", model_name="m", model_version="1", outputs=tensors)
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decode", [decode_request, decode_response], ids=["request", "response"])
def test_mutated_bodies_never_escape_bad_input(seed: int, decode: Decoder) -> None:
    """Flip, insert, delete and truncate bytes of a valid body: BadInput or success only."""
    valid = _valid_body("inputs" if decode is decode_request else "outputs")
    rng = np.random.default_rng(seed)
    for _ in range(200):
        body = bytearray(valid)
        for _ in range(int(rng.integers(1, 4))):
            position = int(rng.integers(0, len(body)))
            action = int(rng.integers(0, 4))
            if action == 0:
                body[position] = int(rng.integers(0, 256))
            elif action == 1:
                body.insert(position, int(rng.choice(list(b'0123456789-.,[]{}":'))))
            elif action == 2:
                del body[position]
            else:
                del body[position:]
            if not body:
                break
        with contextlib.suppress(BadInput):
            decode(bytes(body))


def test_valid_bodies_used_by_fuzzers_decode() -> None:
    request = decode_request(_valid_body("inputs"))
    response = decode_response(_valid_body("outputs"))
    assert list(request.inputs) == ["f", "s", "b", "i"]
    assert list(response.outputs) == ["f", "s", "b", "i"]
    assert request.timeout_us == 5
    assert request.outputs == ("y",)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("message", ["boom", "", "ünïcode ✗", "line\nbreak", "x" * 1000])
@pytest.mark.parametrize("request_id", ["", "req-1"])
def test_error_round_trip(message: str, request_id: str) -> None:
    body = encode_error(message, request_id)
    header = header_of(body)
    assert header["error"] == message
    if request_id:
        assert header["id"] == request_id
    else:
        assert "id" not in header
    assert payload_of(body) == b""
    assert decode_error(body) == message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"plain text failure", "plain text failure"),
        (b"no responders", "no responders"),
        (b"", "unknown error"),
        (b"abc", "abc"),
        ("über".encode(), "über"),
        (b"bad \xff byte", "bad \ufffd byte"),
        (frame({"id": "x"}), "unknown error"),
        (frame({"error": 42}), "42"),
    ],
)
def test_decode_error_lenient(body: bytes, expected: str) -> None:
    assert decode_error(body) == expected


def test_decode_error_on_framed_non_object_falls_back_to_text() -> None:
    body = frame_raw(b"[1]")
    assert decode_error(body) == body.decode(errors="replace")


def test_decode_error_ignores_trailing_data() -> None:
    assert decode_error(frame({"error": "oops"}, b"\x00\x01")) == "oops"


# ------------------------------------------------------------------------------- signature

SPEC_CASES: list[tuple[TensorSpec, Array]] = [
    (TensorSpec("x", "FP32", (-1, 4)), np.zeros((3, 4), "<f4")),
    (TensorSpec("x", "FP32", (-1, 4)), np.zeros((0, 4), ">f4")),
    (TensorSpec("x", "INT64", (2, -1, -1)), np.zeros((2, 5, 1), "<i8")),
    (TensorSpec("x", "BOOL", ()), np.array(True)),
    (TensorSpec("x", "BYTES", (-1,)), np.array(["a", "b"])),
    (TensorSpec("x", "BYTES", (-1,)), np.array([b"a"], dtype=object)),
]


@pytest.mark.parametrize(("spec", "array"), SPEC_CASES)
def test_tensor_spec_accepts(spec: TensorSpec, array: Array) -> None:
    spec.check(array)


@pytest.mark.parametrize(
    ("spec", "array", "fragment"),
    [
        (TensorSpec("x", "FP32", (-1, 4)), np.zeros((3, 4), "<f8"), "must be FP32, got FP64"),
        (TensorSpec("x", "INT64", (-1,)), np.zeros(3, "<i4"), "must be INT64, got INT32"),
        (TensorSpec("x", "BYTES", (-1,)), np.zeros(3, "<u1"), "must be BYTES"),
        (TensorSpec("x", "FP32", (-1, 4)), np.zeros((3, 5), "<f4"), r"shape \[\*, 4\]"),
        (TensorSpec("x", "FP32", (-1, 4)), np.zeros(4, "<f4"), "got \\[4\\]"),
        (TensorSpec("x", "FP32", (-1, 4)), np.zeros((1, 1, 4), "<f4"), "shape"),
        (TensorSpec("x", "FP32", ()), np.zeros(1, "<f4"), "shape"),
        (TensorSpec("x", "FP32", (2,)), np.array(1.0, "<f4"), "shape"),
        (TensorSpec("x", "FP32", (2,)), np.zeros(2, "complex64"), "no V2 datatype"),
    ],
)
def test_tensor_spec_rejects(spec: TensorSpec, array: Array, fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment):
        spec.check(array)


@pytest.mark.parametrize(
    ("name", "datatype", "shape"),
    [("x", "FP8", (1,)), ("x", "fp32", (1,)), ("x", "FP32", (-2,)), ("x", "FP32", (1, -5))],
)
def test_tensor_spec_invalid_is_config_error(
    name: str, datatype: str, shape: tuple[int, ...]
) -> None:
    with pytest.raises(ConfigError):
        TensorSpec(name, datatype, shape)


SIGNATURE = Signature(
    inputs=(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "BYTES", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1,)),),
)


def test_signature_accepts_exact_inputs() -> None:
    SIGNATURE.check_inputs({"a": np.zeros((3, 2), "<f4"), "b": np.array(["p", "q", "r"])})


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"a": np.zeros((3, 2), "<f4")}, r"missing \['b'\]"),
        ({}, r"missing \['a', 'b'\]"),
        (
            {"a": np.zeros((3, 2), "<f4"), "b": np.array(["p"]), "c": np.zeros(1)},
            r"unexpected \['c'\]",
        ),
        ({"a": np.zeros((3, 3), "<f4"), "b": np.array(["p"])}, "'a' must have shape"),
        ({"a": np.zeros((3, 2), "<f4"), "b": np.zeros(3, "<f4")}, "'b' must be BYTES"),
    ],
)
def test_signature_rejects(tensors: dict[str, Array], fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment):
        SIGNATURE.check_inputs(tensors)


def test_signature_dict_round_trip_and_examples() -> None:
    assert Signature.from_dict(SIGNATURE.to_dict()) == SIGNATURE
    examples = SIGNATURE.examples(batch=3)
    assert examples["a"].shape == (3, 2)
    assert examples["a"].dtype == np.dtype("<f4")
    assert examples["b"].tolist() == [b"", b"", b""]
    SIGNATURE.check_inputs(examples)
    decoded = decode_request(encode_request(InferRequest(id="", inputs=examples))).inputs
    SIGNATURE.check_inputs(decoded)


def test_error_text_is_capped_in_body_and_header_alike() -> None:
    """Error text repeats parts of the request; a reply must stay small whatever it says."""
    body, headers = error_reply(BadInput("x\r\n" * 10_000))
    assert decode_error(body) == ("x\r\n" * 342)[:MAX_ERROR_TEXT]
    assert MAX_ERROR_TEXT == 1024
    assert headers[ERROR_HEADER] == " ".join(["x"] * 342)  # one line, within the cap
    assert headers[ERROR_CODE_HEADER] == "400"
