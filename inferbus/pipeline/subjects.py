"""Subject and queue-group names: the routing contract between clients and workers."""

from __future__ import annotations

from typing import Final

from inferbus.errors import BadInput, RequestError
from inferbus.repository import NAME_PATTERN

PREFIX: Final = "inferbus.infer"
SERVICE_NAME: Final = "inferbus"
# NATS micro (ADR-32) error headers, set on error replies only.
ERROR_HEADER: Final = "Nats-Service-Error"
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
MAX_ERROR_TEXT: Final = 512


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


def error_headers(error: RequestError) -> dict[str, str]:
    """The ADR-32 error headers; values are one line (CR/LF would end the header block)."""
    text = " ".join(error.message.split())[:MAX_ERROR_TEXT]
    return {ERROR_HEADER: text, ERROR_CODE_HEADER: str(error.code)}
