"""Connecting to NATS with the options every inferbus process shares."""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Final

import nats
from nats.aio.client import Client as NatsClient

from inferbus.errors import ConnectionFailed

SERVERS_ENV: Final = "INFERBUS_SERVERS"
CREDS_ENV: Final = "INFERBUS_CREDS"
DEFAULT_SERVERS: Final = "nats://127.0.0.1:4222"
# Tensors are large: the 2 MiB default would drop a single image batch during a reconnect.
PENDING_SIZE: Final = 64 * 1024 * 1024
INITIAL_ATTEMPTS: Final = 2

log = logging.getLogger("inferbus")


def default_servers() -> list[str]:
    """``$INFERBUS_SERVERS`` (comma-separated) or the embedded server's address."""
    return split_servers(os.environ.get(SERVERS_ENV) or DEFAULT_SERVERS)


def split_servers(servers: str | list[str]) -> list[str]:
    items = servers.split(",") if isinstance(servers, str) else servers
    urls = [item.strip() for item in items if item.strip()]
    if not urls:
        raise ConnectionFailed("no NATS server URL given")
    return urls


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach NATS. URLs may carry ``user:password@`` or a token; ``creds`` is a
    NATS credentials file; ``tls_*`` configure TLS (``tls://`` URLs use it too)."""

    servers: list[str] = field(default_factory=default_servers)
    name: str = "inferbus"
    creds: str | None = field(default_factory=lambda: os.environ.get(CREDS_ENV))
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 2.0

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


async def _log_error(exc: Exception) -> None:
    log.debug("NATS: %s", exc)


async def _log_disconnect() -> None:
    log.debug("NATS: disconnected")


async def _log_reconnect() -> None:
    log.info("NATS: reconnected")


async def connect_nats(options: ConnectOptions) -> NatsClient:
    """A connected client; ``ConnectionFailed`` when no server answers."""
    try:
        client = await nats.connect(
            servers=options.servers,
            name=options.name,
            user_credentials=options.creds,
            tls=options.tls_context(),
            connect_timeout=options.connect_timeout,
            allow_reconnect=True,
            # Give up quickly on the first connect; reconnect forever once connected (below).
            max_reconnect_attempts=INITIAL_ATTEMPTS,
            reconnect_time_wait=0.5,
            pending_size=PENDING_SIZE,
            error_cb=_log_error,
            disconnected_cb=_log_disconnect,
            reconnected_cb=_log_reconnect,
        )
    except Exception as exc:  # nats-py raises OSError, TimeoutError or its own NoServersError
        raise ConnectionFailed(f"cannot reach NATS at {', '.join(options.servers)}: {exc}") from exc
    # nats-py reads this option on every reconnect: a live process never gives up on its cluster.
    client.options["max_reconnect_attempts"] = -1
    return client
