"""The one place where nats-py's errors become inferbus errors (httpx's map_exceptions)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from inferbus.errors import DeadlineExceeded, ModelNotFound, RequestError, Unavailable


@contextmanager
def nats_errors(
    subject: str, timeout: float, *, nobody: type[RequestError] = ModelNotFound
) -> Iterator[None]:
    """Translate a request's NATS errors. ``nobody`` is what "no responders" means here: no
    worker serves a model (404), or the peer of a transfer went away (503)."""
    try:
        yield
    except NoRespondersError:
        text = "no worker serves" if nobody is ModelNotFound else "nobody listens on"
        raise nobody(f"{text} {subject}") from None
    except NatsTimeoutError:
        # Nothing came back at all: the worker may be gone, so the caller may try another.
        raise DeadlineExceeded(f"no reply within {timeout:g}s", silent=True) from None
    except ConnectionClosedError as exc:
        raise Unavailable(f"NATS connection closed: {exc}") from exc
