"""HTTP V2 bodies to bus bodies and back: pure functions, no I/O (docs/GATEWAY.md).

A request with Triton's binary tensor extension keeps its tensor bytes untouched: only the JSON
header's length moves from the ``Inference-Header-Content-Length`` HTTP header into the u32
prefix of the bus body. Inputs sent as JSON ``data`` lists are encoded to binary first; outputs
come back binary or as ``data`` lists, as the request asked (``binary_data_output``,
``binary_data``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from inferbus.codecs import BYTES, DATATYPES, numpy_dtype, raw
from inferbus.codecs.wire import decode_response
from inferbus.errors import BadInput, EngineFailure, PayloadTooLarge

INFERENCE_HEADER: Final = "Inference-Header-Content-Length"
#: the largest JSON header: JSON ``data`` lists take ~10x their size in memory and CPU to read,
#: all of it holding the GIL; tensors that large belong in binary data (413 beyond)
MAX_JSON_BYTES: Final = 8 * 1024 * 1024
_PREFIX: Final = struct.Struct("<I")
_INT_DIGITS: Final = 18  # any count with more digits is past any limit (and int() stays cheap)


def parse_count(text: str, what: str) -> int:
    """A non-negative integer from a header or path; BadInput for anything else, including
    numbers too long to be real (int() on thousands of digits is slow, then refused)."""
    if not text.isascii() or not text.isdigit() or len(text) > _INT_DIGITS:
        raise BadInput(f"{what} must be a non-negative integer below 10^{_INT_DIGITS}")
    return int(text)


@dataclass(frozen=True, slots=True)
class BusRequest:
    """A request ready for the bus: ``body`` (framed), its time budget, and which outputs the
    caller wants as binary data (``binary_default`` for any it did not name)."""

    body: bytes
    timeout_us: int
    binary_default: bool
    binary: frozenset[str]
    json: frozenset[str]

    def wants_binary(self, name: str) -> bool:
        return name in self.binary or (self.binary_default and name not in self.json)


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A response for HTTP: ``body``, and the JSON header's length when tensors follow it."""

    body: bytes
    header_length: int | None


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the tensor bytes after it (none without the binary extension)."""
    if header_length is None:
        return body, memoryview(b"")
    length = parse_count(header_length, INFERENCE_HEADER)
    if length > len(body):
        raise BadInput(f"{INFERENCE_HEADER} {length} runs past the end of a {len(body)}-byte body")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def to_bus(body: bytes, header_length: str | None, *, timeout_us: int) -> BusRequest:
    """The bus body for an HTTP request body; ``timeout_us`` applies unless the request's
    ``parameters.timeout`` says otherwise."""
    json_text, data = split_body(body, header_length)
    if len(json_text) > MAX_JSON_BYTES:
        raise PayloadTooLarge(
            f"JSON header of {len(json_text)} bytes exceeds {MAX_JSON_BYTES}: send large "
            f"tensors as binary data ({INFERENCE_HEADER})"
        )
    header = _json_object(json_text)
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadInput("request.parameters must be an object")
    budget = parameters.get("timeout", timeout_us)
    if type(budget) is not int or budget < 0:
        raise BadInput("parameters.timeout must be a non-negative integer (microseconds)")
    binary, json = _output_choices(header.get("outputs"))
    inputs = header.get("inputs")
    if type(inputs) is not list:
        raise BadInput("'inputs' must be a list of tensors")
    rewrite = "timeout" not in parameters or any(_has_data(entry) for entry in inputs)
    if rewrite:
        chunks = _binary_inputs(inputs, data)
        header["parameters"] = {**parameters, "timeout": budget}
        json_text = orjson.dumps(header)
        framed = b"".join([_PREFIX.pack(len(json_text)), json_text, *chunks])
    else:  # tensors untouched: only the JSON length moves into the body
        framed = b"".join([_PREFIX.pack(len(json_text)), json_text, data])
    return BusRequest(
        body=framed,
        timeout_us=budget,
        binary_default=parameters.get("binary_data_output") is True,
        binary=binary,
        json=json,
    )


def _json_object(text: bytes) -> dict[str, Any]:
    try:
        header = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"JSON header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise BadInput("JSON header must be an object")
    return header


def _has_data(entry: object) -> bool:
    return isinstance(entry, dict) and "data" in entry


def _output_choices(outputs: object) -> tuple[frozenset[str], frozenset[str]]:
    """The outputs named with ``parameters.binary_data`` true, and those with it false."""
    if not isinstance(outputs, list):
        return frozenset(), frozenset()
    binary: set[str] = set()
    json: set[str] = set()
    for entry in outputs:
        wanted = (entry.get("parameters") or {}) if isinstance(entry, dict) else {}
        if isinstance(wanted, dict) and "binary_data" in wanted:
            (binary if wanted["binary_data"] is True else json).add(str(entry.get("name")))
    return frozenset(binary), frozenset(json)


def _binary_inputs(inputs: list[Any], data: memoryview) -> list[bytes | memoryview]:
    """Each input's bytes in order; entries with ``data`` are encoded and rewritten in place.
    Entries without are left for the worker to check (their declared sizes included)."""
    chunks: list[bytes | memoryview] = []
    offset = 0
    for index, entry in enumerate(inputs):
        if not _has_data(entry):
            size = (
                (entry.get("parameters") or {}).get("binary_data_size")
                if isinstance(entry, dict)
                else None
            )
            step = size if type(size) is int and size >= 0 else 0
            chunks.append(data[offset : offset + step])
            offset += step
            continue
        encoded = raw.encode(_array_from_json(entry, index), entry["datatype"])
        parameters = entry.get("parameters") or {}
        entry.pop("data")
        entry["parameters"] = {**parameters, "binary_data_size": len(encoded)}
        chunks.append(encoded)
    chunks.append(data[offset:])  # bytes nobody declared: the worker refuses them (400)
    return chunks


def _array_from_json(entry: dict[str, Any], index: int) -> np.ndarray:
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    where = f"inputs[{index}] ({name})"
    if type(datatype) is not str or datatype not in DATATYPES:
        raise BadInput(f"{where}: unknown datatype {datatype!r}")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInput(f"{where}: shape must be a list of non-negative integers")
    try:
        flat = np.asarray(entry["data"], dtype=object).reshape(-1)
        if flat.size != math.prod(shape):
            raise BadInput(f"{where}: {flat.size} values do not fill shape {shape}")
        _check_json_types(flat, datatype, where)
        if datatype == BYTES:
            values = np.empty(flat.size, dtype=object)
            values[:] = [v.encode() for v in flat]
            return values.reshape(shape)
        return flat.astype(numpy_dtype(datatype)).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"{where}: data does not fit {datatype} {shape}: {exc}") from None


def _check_json_types(flat: np.ndarray, datatype: str, where: str) -> None:
    """JSON values as Triton takes them: strings for BYTES, booleans for BOOL, integers for
    integer types, numbers for floats. Nothing is coerced ("false" is not a BOOL true, 1.9 not
    an INT 1), and no value is taken as a size (bytes(10**9) would allocate a gigabyte)."""
    if datatype == BYTES:
        wanted: tuple[type, ...] = (str,)
    elif datatype == "BOOL":
        wanted = (bool,)
    elif datatype.startswith(("INT", "UINT")):
        wanted = (int,)
    else:
        wanted = (int, float)
    if not all(type(value) in wanted for value in flat):
        names = " or ".join(kind.__name__ for kind in wanted)
        raise BadInput(f"{where}: {datatype} data must be JSON values of type {names}")


def to_http(reply: bytes | bytearray, request: BusRequest) -> HttpReply:
    """The HTTP response for a bus reply: the worker's JSON and tensors as they are when every
    output is wanted binary; otherwise decoded, with ``data`` lists for the JSON ones."""
    if len(reply) < 4:
        raise EngineFailure("malformed reply: shorter than its length prefix")
    length = _PREFIX.unpack_from(reply)[0]
    try:
        header = _json_object(bytes(memoryview(reply)[4 : 4 + length]))
    except BadInput as exc:  # the worker's fault, not the caller's
        raise EngineFailure(f"malformed reply: {exc.message}") from None
    names = [e.get("name") for e in header.get("outputs") or [] if isinstance(e, dict)]
    coded = any("codec" in (e.get("parameters") or {}) for e in header.get("outputs") or [])
    if names and not coded and all(request.wants_binary(str(n)) for n in names):
        return HttpReply(bytes(memoryview(reply)[4:]), length)
    try:
        response = decode_response(reply)
    except BadInput as exc:
        raise EngineFailure(f"malformed reply: {exc.message}") from None
    entries: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": _datatype(header, name)}
        entry["shape"] = list(array.shape)
        if request.wants_binary(name):
            encoded = raw.encode(array, entry["datatype"])
            entry["parameters"] = {"binary_data_size": len(encoded)}
            chunks.append(encoded)
        else:
            entry["data"] = _json_data(array)
        entries.append(entry)
    body = {"id": response.id, "model_name": response.model_name,
            "model_version": response.model_version, "outputs": entries}  # fmt: skip
    text = orjson.dumps(body)
    return HttpReply(b"".join([text, *chunks]), len(text) if chunks else None)


def _datatype(header: dict[str, Any], name: str) -> str:
    for entry in header.get("outputs") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return str(entry.get("datatype"))
    raise EngineFailure(f"malformed reply: no entry for output {name!r}")


def _json_data(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == object:  # BYTES: text where it is UTF-8, as Triton answers
        return [bytes(v).decode(errors="replace") for v in flat]
    return list(flat.tolist())
