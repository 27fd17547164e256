"""The one place where nats-py's errors become inferbus errors (httpx's map_exceptions)."""

from __future__ import annotations

from types import TracebackType

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from inferbus.errors import DeadlineExceeded, ModelNotFound, RequestError, Unavailable


class nats_errors:  # noqa: N801  (used like a function: ``with nats_errors(...):``)
    """Translate a request's NATS errors. ``nobody`` is what "no responders" means here: no
    worker serves a model (404), or the peer of a transfer went away (503).

    A class, not a ``contextlib.contextmanager``: it wraps every request, and a generator-based
    manager costs a few µs each time."""

    __slots__ = ("nobody", "subject", "timeout")

    def __init__(
        self, subject: str, timeout: float, *, nobody: type[RequestError] = ModelNotFound
    ) -> None:
        self.subject = subject
        self.timeout = timeout
        self.nobody = nobody

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, NoRespondersError):
            text = "no worker serves" if self.nobody is ModelNotFound else "nobody listens on"
            raise self.nobody(f"{text} {self.subject}") from None
        if isinstance(exc, NatsTimeoutError):
            # Nothing came back at all: the worker may be gone, so the caller may try another.
            raise DeadlineExceeded(f"no reply within {self.timeout:g}s", silent=True) from None
        if isinstance(exc, ConnectionClosedError):
            raise Unavailable(f"NATS connection closed: {exc}") from exc
