"""Every error inferbus raises, under one root.

::

    InferbusError
    ├── ConfigError                     a model repository or option is wrong (never on the wire)
    ├── ServerError                     the embedded nats-server could not start or stop
    ├── ConnectionFailed(ConnectionError)  NATS could not be reached
    └── RequestError                    an inference request failed; ``code`` is its wire code
        ├── BadInput(ValueError)              400 malformed, mistyped or misshaped request
        ├── Forbidden(PermissionError)        403 the model is not granted to the caller
        ├── ModelNotFound(LookupError)        404 no worker serves this model or version
        ├── PayloadTooLarge(ValueError)       413 request larger than the model accepts
        ├── Overloaded                        429 the worker's queue or the caller's quota is full
        ├── EngineFailure                     500 the engine raised while computing
        ├── Unavailable                       503 the worker cannot serve right now
        └── DeadlineExceeded(TimeoutError)    504 the time budget ran out

A worker replies with the code; the client raises the matching class (``error_for_code``).
"""

from __future__ import annotations

from typing import ClassVar


class InferbusError(Exception):
    """Root of every inferbus error."""


class ConfigError(InferbusError):
    """A model repository, config file or option is invalid."""


class ServerError(InferbusError):
    """The embedded nats-server could not be started or stopped."""


class ConnectionFailed(InferbusError, ConnectionError):
    """No NATS server could be reached."""


class IdentityRefused(ConnectionFailed):
    """A NATS server answered, and refused the identity (credentials, nkey, certificate)."""


class RequestError(InferbusError):
    """An inference request failed. ``code`` is the HTTP-like status carried on the wire."""

    code: ClassVar[int] = 500

    def __init__(
        self, message: str, *, model: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        #: when the sender may try again (429 from a quota), if the worker said
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        prefix = f"[{self.code}]"
        return (
            f"{prefix} {self.model}: {self.message}" if self.model else f"{prefix} {self.message}"
        )


class BadInput(RequestError, ValueError):
    code = 400


class Forbidden(RequestError, PermissionError):
    code = 403


class ModelNotFound(RequestError, LookupError):
    code = 404


class PayloadTooLarge(RequestError, ValueError):
    code = 413


class Overloaded(RequestError):
    code = 429


class EngineFailure(RequestError):
    code = 500


class Unavailable(RequestError):
    code = 503


class DeadlineExceeded(RequestError, TimeoutError):
    code = 504

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        silent: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, model=model, retry_after_s=retry_after_s)
        #: no reply came at all (the worker may be gone), rather than a worker's 504
        self.silent = silent


_BY_CODE: dict[int, type[RequestError]] = {
    cls.code: cls
    for cls in (
        BadInput,
        Forbidden,
        ModelNotFound,
        PayloadTooLarge,
        Overloaded,
        EngineFailure,
        Unavailable,
        DeadlineExceeded,
    )
}


def error_for_code(
    code: int, message: str, *, model: str | None = None, retry_after_s: float | None = None
) -> RequestError:
    """The exception for a wire error code; unknown codes become ``EngineFailure``."""
    return _BY_CODE.get(code, EngineFailure)(message, model=model, retry_after_s=retry_after_s)
