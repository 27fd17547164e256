"""What other programs rely on: names, subjects, error replies and model signatures.

Everything here is part of the wire contract in docs/PROTOCOL.md; change that document first.
The application end imports only this, the codecs and the errors — never engines or metrics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, NoReturn, Protocol

import numpy as np
import orjson

from inferbus.codecs import BYTES, DATATYPES, Tensors, datatype_of, numpy_dtype
from inferbus.codecs import decode_error_fields as _decode_error_fields
from inferbus.codecs import encode_error as _encode_error_body
from inferbus.errors import BadInput, ConfigError, RequestError, error_for_code

__all__ = [
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "MAX_ERROR_TEXT",
    "MAX_REPLY_SUBJECT",
    "NAME_PATTERN",
    "PREFIX",
    "REQUEST_INFO_HEADER",
    "SERVICE_NAME",
    "Signature",
    "TensorSpec",
    "Tensors",
    "check_model_name",
    "endpoint_metadata",
    "endpoint_name",
    "error_from_reply",
    "error_reply",
    "infer_subject",
    "queue_group",
    "reply_subject_problem",
    "requester_account",
    "service_subject",
]

# --- names and subjects (PROTOCOL.md sections 2 and 10) -----------------------------------------

NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]+")  # a NATS token; use with fullmatch
PREFIX: Final = "inferbus.infer"
SERVICE_NAME: Final = "inferbus"


def check_model_name(model: str) -> str:
    if not NAME_PATTERN.fullmatch(model):
        raise BadInput(f"model name {model!r} must match [A-Za-z0-9_-]+")
    return model


def infer_subject(model: str, version: int | None = None) -> str:
    """``inferbus.infer.<model>`` or, pinned to a version, ``inferbus.infer.<model>.<version>``."""
    check_model_name(model)
    if version is None:
        return f"{PREFIX}.{model}"
    if type(version) is not int or version < 1:
        raise BadInput(f"version must be an integer >= 1, not {version!r}")
    return f"{PREFIX}.{model}.{version}"


def queue_group(model: str, version: int | None = None) -> str:
    """The queue group that balances a subject's requests across workers."""
    return model if version is None else f"{model}.{version}"


def endpoint_name(model: str, version: int | None = None) -> str:
    """The ADR-32 endpoint name: ``<model>`` (unversioned subject) or ``<model>_v<version>``."""
    return model if version is None else f"{model}_v{version}"


# nats-server refuses a control line over 4096 bytes and closes the connection that sent it. A
# reply subject this long leaves room for the rest of a reply's control line and headers.
MAX_REPLY_SUBJECT: Final = 1024
_PLAIN_SUBJECT: Final = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")


def reply_subject_problem(subject: str) -> str | None:
    """Why a worker must not publish to ``subject``, or None when it may (PROTOCOL.md, 14).

    Refused: over ``MAX_REPLY_SUBJECT`` bytes, empty tokens, whitespace or wildcards, and the
    platform's own subjects (``inferbus.…`` and ``$…``) — a request must not turn a worker into
    a publisher on subjects other programs listen to."""
    size = len(subject) if subject.isascii() else len(subject.encode())
    if size > MAX_REPLY_SUBJECT:
        return f"longer than {MAX_REPLY_SUBJECT} bytes"
    if not _PLAIN_SUBJECT.fullmatch(subject):
        return "not a plain NATS subject (empty token, whitespace or wildcard)"
    if subject.startswith(("$", "inferbus.")):
        return "a platform subject ($… or inferbus.…)"
    return None


def service_subject(verb: str, service_id: str | None = None) -> str:
    """``$SRV.<VERB>.inferbus`` (every worker answers) or one worker's ``...<id>``."""
    subject = f"$SRV.{verb.upper()}.{SERVICE_NAME}"
    return subject if service_id is None else f"{subject}.{service_id}"


def endpoint_metadata(
    model: str,
    version: int,
    signature: Signature,
    *,
    engine: str,
    device: str,
    max_batch_size: int,
    instances: int,
) -> dict[str, str]:
    """An endpoint's ADR-32 metadata: strings only, so the signature travels as JSON text."""
    return {
        "model": model,
        "version": str(version),
        "engine": engine,
        "device": device,
        "max_batch_size": str(max_batch_size),
        "instances": str(instances),
        "signature": orjson.dumps(signature.to_dict()).decode(),
    }


# --- error replies (PROTOCOL.md section 8) ------------------------------------------------------

# NATS micro (ADR-32) error headers, set on error replies only.
ERROR_HEADER: Final = "Nats-Service-Error"
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
# Error text repeats parts of the request: the one cap for both the header and the body.
MAX_ERROR_TEXT: Final = 1024


def error_reply(error: RequestError) -> tuple[bytes, dict[str, str]]:
    """The body and headers that carry ``error``; the header value is one line (CR/LF would
    end the header block)."""
    text = error.message[:MAX_ERROR_TEXT]
    line = " ".join(text.split())[:MAX_ERROR_TEXT]
    retry = error.retry_after_s
    retry_ms = None if retry is None else max(0, round(retry * 1000))
    body = _encode_error_body(text, retry_after_ms=retry_ms)
    return body, {ERROR_HEADER: line, ERROR_CODE_HEADER: str(error.code)}


def error_from_reply(
    headers: Mapping[str, str] | None, body: bytes | bytearray, *, model: str | None = None
) -> RequestError | None:
    """The error an error reply carries, or None for a success reply; non-numeric codes are 500."""
    code = (headers or {}).get(ERROR_CODE_HEADER)
    if code is None:
        return None
    number = int(code) if code.isascii() and code.isdigit() else 500
    message, retry_ms = _decode_error_fields(bytes(body))
    retry = None if retry_ms is None else retry_ms / 1000
    return error_for_code(number, message, model=model, retry_after_s=retry)


# --- identity on a shared bus (PROTOCOL.md section 14) -------------------------------------------

#: written by nats-server on requests that cross a service import with ``share: true``
REQUEST_INFO_HEADER: Final = "Nats-Request-Info"


def requester_account(headers: Mapping[str, str] | None) -> str | None:
    """The NATS account a request came from, as the server wrote it (``acc`` in
    ``Nats-Request-Info``); None when the header is absent or unreadable. Trust it only on a
    bus whose accounts the roster made: there the server writes it, and a sender cannot."""
    if not headers:
        return None
    info = headers.get(REQUEST_INFO_HEADER)
    if info is None:
        return None
    try:
        account = orjson.loads(info).get("acc")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return account if isinstance(account, str) and account else None


# --- signatures (PROTOCOL.md section 10, endpoint metadata) -------------------------------------


class DeclaredTensor(Protocol):
    """What a request says of one tensor before it is decoded."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


class _Declared(NamedTuple):
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ConfigError(f"tensor {self.name!r}: unsupported datatype {self.datatype!r}")
        if any(dim < -1 for dim in self.shape):
            raise ConfigError(f"tensor {self.name!r}: dimensions are -1 (any) or >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))

    def check(self, array: np.ndarray) -> None:
        """Raise BadInput unless ``array`` has this datatype, rank and fixed dimensions."""
        self.check_declared(datatype_of(array), array.shape)

    def check_declared(self, datatype: str, shape: tuple[int, ...]) -> None:
        """The same check on what a request declares, before its data is decoded."""
        if datatype != self.datatype:
            raise BadInput(f"input {self.name!r} must be {self.datatype}, got {datatype}")
        if len(shape) != len(self.shape):
            self._wrong_shape(shape)
        for want, got in zip(self.shape, shape, strict=True):
            if want != got and want != -1:
                self._wrong_shape(shape)

    def _wrong_shape(self, shape: tuple[int, ...]) -> NoReturn:
        raise BadInput(
            f"input {self.name!r} must have shape {_show(self.shape)}, got {list(shape)}"
        )

    def example(self, batch: int = 1) -> np.ndarray:
        """A zero-filled tensor of this spec, its free dimensions set to ``batch``."""
        shape = tuple(batch if dim == -1 else dim for dim in self.shape)
        if self.datatype == BYTES:
            return np.full(shape, b"", dtype=object)
        dtype = numpy_dtype(self.datatype)
        return np.zeros(shape, dtype=dtype)


def _show(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("*" if dim == -1 else str(dim) for dim in shape) + "]"


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        return cls(
            tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
            tuple(TensorSpec.from_dict(d) for d in data["outputs"]),
        )

    def check_inputs(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Raise BadInput unless ``tensors`` holds exactly this signature's inputs."""
        self.check_entries(
            [_Declared(name, datatype_of(a), a.shape) for name, a in tensors.items()]
        )

    def check_entries(self, entries: Sequence[DeclaredTensor]) -> None:
        """The same check on declared tensors, e.g. a request header's entries."""
        specs = self.inputs
        if len(entries) == len(specs) and all(
            entry.name == spec.name for entry, spec in zip(entries, specs, strict=True)
        ):  # the usual case: the signature's inputs, in its order
            for entry, spec in zip(entries, specs, strict=True):
                spec.check_declared(entry.datatype, entry.shape)
            return
        self._check_by_name({entry.name: (entry.datatype, entry.shape) for entry in entries})

    def _check_by_name(self, declared: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        expected = {spec.name for spec in self.inputs}
        if len(declared) != len(expected) or not expected.issuperset(declared):
            missing, unexpected = expected - declared.keys(), declared.keys() - expected
            raise BadInput(
                f"inputs must be {sorted(expected)}; missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for spec in self.inputs:
            spec.check_declared(*declared[spec.name])

    def examples(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {spec.name: spec.example(batch) for spec in self.inputs}
