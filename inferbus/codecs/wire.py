"""The message body: V2 JSON plus binary tensor data, framed for NATS.

::

    [u32 LE: N][N bytes of V2 JSON][tensor 0 bytes][tensor 1 bytes]...

Each tensor's byte count is its ``parameters.binary_data_size``; tensors follow in the
order the JSON lists them. docs/PROTOCOL.md is the normative description.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import orjson

from inferbus.codecs import raw
from inferbus.codecs._datatypes import BYTES, DATATYPES, datatype_of, numpy_dtype
from inferbus.codecs.base import RAW, Choices, Codec
from inferbus.codecs.registry import codec_for, get_codec
from inferbus.errors import BadInput, PayloadTooLarge

_PREFIX: Final = struct.Struct("<I")
MAX_RANK: Final = 32
MAX_ELEMENTS: Final = 2**48  # far past any body NATS can carry
# What a decoder may allocate unless told otherwise: workers pass their model's limit.
DEFAULT_DECODE_LIMIT: Final = 1 << 30
BYTES_ELEMENT_COST: Final = 48  # what one bytes object costs in memory, beyond its content

Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request. ``timeout_us`` is the caller's remaining budget."""

    id: str
    inputs: Tensors
    outputs: tuple[str, ...] = ()
    timeout_us: int | None = None
    reply_codec: str | None = None  # the codec the caller wants the outputs in

    def __post_init__(self) -> None:
        if self.timeout_us is not None and self.timeout_us < 0:
            raise BadInput("timeout must not be negative")


@dataclass(frozen=True, slots=True)
class InferResponse:
    """A decoded inference response."""

    id: str
    model_name: str
    model_version: str
    outputs: Tensors = field(default_factory=dict)


class TensorEntry(NamedTuple):
    """One tensor as the JSON header declares it; ``size`` is its bytes on the wire."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    size: int
    codec: Codec | None  # None: raw


class RequestHeader(NamedTuple):
    """A request whose JSON header is read and checked but whose tensors are not decoded yet:
    a receiver validates the declared names, datatypes and shapes before any codec runs.
    (A NamedTuple: made once per request on the hot path, where a frozen dataclass costs.)"""

    id: str
    tensors: tuple[TensorEntry, ...]
    data: memoryview  # the tensor bytes, in the order of ``tensors``
    outputs: tuple[str, ...] = ()
    timeout_us: int | None = None
    reply_codec: str | None = None

    @property
    def expands(self) -> bool:
        """Some tensor uses a codec, so decoding may take far more memory and time than the
        body's size suggests."""
        return any(entry.codec is not None for entry in self.tensors)

    def decoded_bytes(self) -> int:
        """What the tensors take once decoded, at least: exact for numeric tensors; for BYTES,
        the per-element cost (their content adds to it)."""
        total = 0
        for entry in self.tensors:
            dtype = numpy_dtype(entry.datatype)
            itemsize = BYTES_ELEMENT_COST if dtype is None else dtype.itemsize
            total += math.prod(entry.shape) * itemsize
        return total


_NO_PARAMETERS: Final[dict[str, Any]] = {}


def encode_request(request: InferRequest, codecs: Choices = None) -> bytes:
    """The request body; ``codecs`` picks each input's codec (one for all, or by name)."""
    header: dict[str, Any] = {"id": request.id}
    parameters: dict[str, Any] = {}
    if request.timeout_us is not None:
        parameters["timeout"] = request.timeout_us
    if request.reply_codec is not None:
        parameters["reply_codec"] = get_codec(request.reply_codec).name
    if parameters:
        header["parameters"] = parameters
    if request.outputs:
        header["outputs"] = [{"name": name} for name in request.outputs]
    return _frame(header, "inputs", request.inputs, codecs)


def decode_request(body: bytes | bytearray, limit: int = DEFAULT_DECODE_LIMIT) -> InferRequest:
    """The request in ``body``; decoding allocates at most ``limit`` bytes (else 413)."""
    return decode_tensors(read_request_header(body), limit)


def read_request_header(body: bytes | bytearray) -> RequestHeader:
    """The request's JSON header, checked, with its tensor entries; no tensor is decoded."""
    header, data = _unframe(body)
    timeout = reply_codec = None
    parameters = header.get("parameters")
    if parameters is not None:
        if type(parameters) is not dict:
            raise BadInput("request.parameters must be an object")
        timeout = parameters.get("timeout")
        if timeout is not None and (type(timeout) is not int or timeout < 0):
            raise BadInput("parameters.timeout must be a non-negative integer (microseconds)")
        reply_codec = _reply_codec(parameters.get("reply_codec"))
    outputs = header.get("outputs")
    return RequestHeader(
        id=_request_id(header),
        tensors=_entries(header, "inputs", data),
        data=data,
        outputs=_requested_outputs(outputs) if outputs is not None else (),
        timeout_us=timeout,
        reply_codec=reply_codec,
    )


def decode_tensors(header: RequestHeader, limit: int = DEFAULT_DECODE_LIMIT) -> InferRequest:
    """Decode a checked header's tensors, allocating at most ``limit`` bytes (else 413)."""
    return InferRequest(
        id=header.id,
        inputs=_decode_entries(header.tensors, header.data, limit),
        outputs=header.outputs,
        timeout_us=header.timeout_us,
        reply_codec=header.reply_codec,
    )


def encode_response(response: InferResponse, codecs: Choices = None) -> bytes:
    header = {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    return _frame(header, "outputs", response.outputs, codecs)


def decode_response(body: bytes | bytearray, limit: int = DEFAULT_DECODE_LIMIT) -> InferResponse:
    header, data = _unframe(body)
    return InferResponse(
        id=_request_id(header),
        model_name=str(header.get("model_name", "")),
        model_version=str(header.get("model_version", "")),
        outputs=_decode_entries(_entries(header, "outputs", data), data, limit),
    )


def encode_error(message: str, request_id: str = "", retry_after_ms: int | None = None) -> bytes:
    """An error body; ``inferbus.contract.error_reply`` caps the message first."""
    header: dict[str, Any] = (
        {"id": request_id, "error": message} if request_id else {"error": message}
    )
    if retry_after_ms is not None:
        header["retry_after_ms"] = retry_after_ms
    json = orjson.dumps(header)
    return _PREFIX.pack(len(json)) + json


def decode_error(body: bytes) -> str:
    """The message of an error body; lenient, since errors may come from any NATS service."""
    return decode_error_fields(body)[0]


def decode_error_fields(body: bytes) -> tuple[str, int | None]:
    """The message of an error body and its ``retry_after_ms`` (None when absent or not a
    non-negative integer); lenient, since errors may come from any NATS service."""
    try:
        header, _ = _unframe(body)
    except BadInput:
        return body.decode(errors="replace") or "unknown error", None
    retry = header.get("retry_after_ms")
    valid = type(retry) is int and 0 <= retry <= 86_400_000
    return str(header.get("error", "unknown error")), retry if valid else None


def _frame(header: dict[str, Any], key: str, tensors: Tensors, codecs: Choices) -> bytes:
    if codecs is not None and isinstance(codecs, Mapping) and not codecs.keys() <= tensors.keys():
        unknown = sorted(codecs.keys() - tensors.keys())
        raise BadInput(f"codecs name tensors {unknown} that are not in {sorted(tensors)}")
    entries: list[dict[str, Any]] = []
    buffers: list[bytes | memoryview] = [b"", b""]  # room for the prefix and the JSON
    for name, value in tensors.items():
        array = value if type(value) is np.ndarray else np.asarray(value)
        datatype = datatype_of(array)
        codec = codec_for(codecs, name)
        parameters: dict[str, Any]
        if codec is None or codec.name == RAW:
            data = raw.encode(array, datatype)
            parameters = {"binary_data_size": len(data)}
        else:
            codec.check(datatype, array.shape)
            data = codec.encode(array, datatype)
            parameters = {"binary_data_size": len(data), "codec": codec.name}
        entry = {"name": name, "datatype": datatype, "shape": array.shape}
        entries.append({**entry, "parameters": parameters})
        buffers.append(data)
    header[key] = entries
    json = orjson.dumps(header)
    buffers[0] = _PREFIX.pack(len(json))
    buffers[1] = json
    return b"".join(buffers)


def _unframe(body: bytes | bytearray) -> tuple[dict[str, Any], memoryview]:
    if len(body) < 4:
        raise BadInput(f"body of {len(body)} bytes is shorter than its 4-byte length prefix")
    length = int.from_bytes(body[:4], "little")
    end = 4 + length
    if end > len(body):
        raise BadInput(f"JSON length {length} runs past the end of a {len(body)}-byte body")
    view = memoryview(body)
    try:
        header = orjson.loads(view[4:end])
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"JSON header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise BadInput("JSON header must be an object")
    return header, view[end:]


def _entries(header: dict[str, Any], key: str, data: memoryview) -> tuple[TensorEntry, ...]:
    raw_entries = header.get(key)
    if type(raw_entries) is not list:
        raise BadInput(f"{key!r} must be a list of tensors")
    entries = tuple([_tensor_entry(entry, key, index) for index, entry in enumerate(raw_entries)])
    declared = sum([entry.size for entry in entries])
    if declared != len(data):
        raise BadInput(f"tensors declare {declared} bytes of data but the body carries {len(data)}")
    if len(entries) > 1:
        names = [entry.name for entry in entries]
        if len(set(names)) != len(names):
            twice = next(name for index, name in enumerate(names) if name in names[:index])
            raise BadInput(f"tensor {twice!r} appears twice")
    return entries


def _decode_entries(
    entries: tuple[TensorEntry, ...], data: memoryview, limit: int
) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        end = offset + entry.size
        chunk = data[offset:end]
        if entry.datatype == BYTES:
            # One Python object per element: charged before any is made.
            limit -= _charge(math.prod(entry.shape) * BYTES_ELEMENT_COST, limit, entry.name)
        if entry.codec is None:
            tensors[entry.name] = raw.decode(chunk, entry.datatype, entry.shape)
        else:
            # Decoding allocates: the whole request's tensors share one budget.
            array = entry.codec.decode(chunk, entry.datatype, entry.shape, limit)
            tensors[entry.name] = array
            limit -= _charge(_plain_bytes(array), limit, entry.name)
        offset = end
    return tensors


def _charge(cost: int, limit: int, name: str) -> int:
    if cost > limit:
        raise PayloadTooLarge(f"tensor {name!r} needs {cost} bytes decoded; {limit} remain")
    return cost


def _plain_bytes(array: np.ndarray) -> int:
    if array.dtype == object:
        return sum(len(value) for value in array.flat)
    return int(array.nbytes)


def _tensor_entry(entry: object, key: str, index: int) -> TensorEntry:
    # On the hot path: plain type checks, and error text built only when there is an error.
    if type(entry) is not dict:
        raise BadInput(f"{key}[{index}] must be an object")
    name, datatype = entry.get("name"), entry.get("datatype")
    if type(name) is not str or not name:
        raise BadInput(f"{key}[{index}].name must be a non-empty string")
    if type(datatype) is not str or datatype not in DATATYPES:
        raise BadInput(f"{key}[{index}] ({name}): unknown datatype {datatype!r}")
    parameters = entry.get("parameters", _NO_PARAMETERS)
    if type(parameters) is not dict:
        raise BadInput(f"{key}[{index}].parameters must be an object")
    if "data" in entry:
        raise BadInput(f"{key}[{index}] ({name}): JSON tensor data is not supported; send binary")
    codec_name = parameters.get("codec", RAW)
    codec = None if codec_name == RAW else _codec(codec_name, key, index, name)
    size = parameters.get("binary_data_size")
    if type(size) is not int or size < 0:
        raise BadInput(
            f"{key}[{index}] ({name}): parameters.binary_data_size must be an integer >= 0"
        )
    shape = _shape(entry.get("shape"), key, index, name)
    if codec is not None:
        codec.check(datatype, shape)
    return TensorEntry(name, datatype, shape, size, codec)


def _codec(name: object, key: str, index: int, tensor: str) -> Codec:
    if type(name) is not str:
        raise BadInput(f"{key}[{index}] ({tensor}): codec must be a string")
    try:
        return get_codec(name)
    except BadInput as exc:
        raise BadInput(f"{key}[{index}] ({tensor}): {exc.message}") from None


def _shape(shape: object, key: str, index: int, name: str) -> tuple[int, ...]:
    where = f"{key}[{index}] ({name})"
    if type(shape) is not list or len(shape) > MAX_RANK:
        raise BadInput(f"{where}: shape must be a list of at most {MAX_RANK} dimensions")
    elements = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise BadInput(f"{where}: shape {shape} must hold non-negative integers")
        # Zeros count as ones here: numpy refuses [0, 2**62] although it holds no element.
        elements *= dim or 1
    if elements > MAX_ELEMENTS:
        raise BadInput(f"{where}: shape {shape} is absurdly large")
    return tuple(shape)


def _reply_codec(name: object) -> str | None:
    if name is None:
        return None
    if type(name) is not str:
        raise BadInput("parameters.reply_codec must be a string")
    return get_codec(name).name


def _request_id(header: dict[str, Any]) -> str:
    value = header.get("id", "")
    if not isinstance(value, str):
        raise BadInput("id must be a string")
    return value


def _requested_outputs(entries: object) -> tuple[str, ...]:
    if type(entries) is not list:
        raise BadInput("outputs must be a list")
    names = tuple(entry.get("name") if type(entry) is dict else None for entry in entries)
    if not all(type(name) is str and name for name in names):
        raise BadInput("each requested output must be an object with a name")
    return names  # type: ignore[return-value]
