"""The message body: V2 JSON plus binary tensor data, framed for NATS.

::

    [u32 LE: N][N bytes of V2 JSON][tensor 0 bytes][tensor 1 bytes]...

Each tensor's byte count is its ``parameters.binary_data_size``; tensors follow in the
order the JSON lists them. docs/PROTOCOL.md is the normative description.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import orjson

from inferbus.codecs import raw
from inferbus.codecs._datatypes import DATATYPES, datatype_of
from inferbus.errors import BadInput

_PREFIX: Final = struct.Struct("<I")
MAX_RANK: Final = 32
MAX_ELEMENTS: Final = 2**48  # far past any body NATS can carry

Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request. ``timeout_us`` is the caller's remaining budget."""

    id: str
    inputs: Tensors
    outputs: tuple[str, ...] = ()
    timeout_us: int | None = None

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


class _TensorEntry(NamedTuple):
    name: str
    datatype: str
    shape: tuple[int, ...]
    size: int


_NO_PARAMETERS: Final[dict[str, Any]] = {}


def encode_request(request: InferRequest) -> bytes:
    header: dict[str, Any] = {"id": request.id}
    if request.timeout_us is not None:
        header["parameters"] = {"timeout": request.timeout_us}
    if request.outputs:
        header["outputs"] = [{"name": name} for name in request.outputs]
    return _frame(header, "inputs", request.inputs)


def decode_request(body: bytes) -> InferRequest:
    header, data = _unframe(body)
    timeout = None
    parameters = header.get("parameters")
    if parameters is not None:
        if type(parameters) is not dict:
            raise BadInput("request.parameters must be an object")
        timeout = parameters.get("timeout")
        if timeout is not None and (type(timeout) is not int or timeout < 0):
            raise BadInput("parameters.timeout must be a non-negative integer (microseconds)")
    outputs = header.get("outputs")
    return InferRequest(
        id=_request_id(header),
        inputs=_read_tensors(header, "inputs", data),
        outputs=_requested_outputs(outputs) if outputs is not None else (),
        timeout_us=timeout,
    )


def encode_response(response: InferResponse) -> bytes:
    header = {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    return _frame(header, "outputs", response.outputs)


def decode_response(body: bytes) -> InferResponse:
    header, data = _unframe(body)
    return InferResponse(
        id=_request_id(header),
        model_name=str(header.get("model_name", "")),
        model_version=str(header.get("model_version", "")),
        outputs=_read_tensors(header, "outputs", data),
    )


def encode_error(message: str, request_id: str = "") -> bytes:
    header = {"id": request_id, "error": message} if request_id else {"error": message}
    json = orjson.dumps(header)
    return _PREFIX.pack(len(json)) + json


def decode_error(body: bytes) -> str:
    """The message of an error body; lenient, since errors may come from any NATS service."""
    try:
        header, _ = _unframe(body)
        return str(header.get("error", "unknown error"))
    except BadInput:
        return body.decode(errors="replace") or "unknown error"


def _frame(header: dict[str, Any], key: str, tensors: Tensors) -> bytes:
    entries: list[dict[str, Any]] = []
    buffers: list[bytes | memoryview] = [b"", b""]  # room for the prefix and the JSON
    for name, value in tensors.items():
        array = value if type(value) is np.ndarray else np.asarray(value)
        datatype = datatype_of(array)
        data = raw.encode(array, datatype)
        size = len(data)
        parameters = {"binary_data_size": size}
        entries.append(
            {"name": name, "datatype": datatype, "shape": array.shape, "parameters": parameters}
        )
        buffers.append(data)
    header[key] = entries
    json = orjson.dumps(header)
    buffers[0] = _PREFIX.pack(len(json))
    buffers[1] = json
    return b"".join(buffers)


def _unframe(body: bytes) -> tuple[dict[str, Any], memoryview]:
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


def _read_tensors(header: dict[str, Any], key: str, data: memoryview) -> dict[str, np.ndarray]:
    raw_entries = header.get(key)
    if type(raw_entries) is not list:
        raise BadInput(f"{key!r} must be a list of tensors")
    entries = [_tensor_entry(entry, key, index) for index, entry in enumerate(raw_entries)]
    declared = sum(entry.size for entry in entries)
    if declared != len(data):
        raise BadInput(f"tensors declare {declared} bytes of data but the body carries {len(data)}")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if entry.name in tensors:
            raise BadInput(f"tensor {entry.name!r} appears twice")
        end = offset + entry.size
        tensors[entry.name] = raw.decode(data[offset:end], entry.datatype, entry.shape)
        offset = end
    return tensors


def _tensor_entry(entry: object, key: str, index: int) -> _TensorEntry:
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
    codec = parameters.get("codec", raw.NAME)
    if codec != raw.NAME:
        raise BadInput(f"{key}[{index}] ({name}): unknown codec {codec!r}")
    size = parameters.get("binary_data_size")
    if type(size) is not int or size < 0:
        raise BadInput(
            f"{key}[{index}] ({name}): parameters.binary_data_size must be an integer >= 0"
        )
    return _TensorEntry(name, datatype, _shape(entry.get("shape"), key, index, name), size)


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
