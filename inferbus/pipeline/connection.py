"""Connecting to NATS with the options every inferbus process shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from nats import errors as nats_error_types
from nats.aio.client import Client as NatsClient

from inferbus.errors import ConfigError, ConnectionFailed, IdentityRefused
from inferbus.tenancy.connection_file import (
    ConnectionFile,
    check_seed_file,
    read_connection_file,
)

SERVERS_ENV: Final = "INFERBUS_SERVERS"
CREDS_ENV: Final = "INFERBUS_CREDS"
NKEY_ENV: Final = "INFERBUS_NKEY"
CONNECTION_ENV: Final = "INFERBUS_CONNECTION"
DEFAULT_SERVERS: Final = "nats://127.0.0.1:4222"
# Tensors are large: the 2 MiB default would drop a single image batch during a reconnect.
PENDING_SIZE: Final = 64 * 1024 * 1024
INITIAL_ATTEMPTS: Final = 2

log = logging.getLogger("inferbus")


def default_servers() -> list[str]:
    """``$INFERBUS_SERVERS`` (comma-separated), the servers of ``$INFERBUS_CONNECTION``, or the
    embedded server's address."""
    if os.environ.get(SERVERS_ENV):
        return split_servers(os.environ[SERVERS_ENV])
    handed = _connection_from_env()
    return list(handed.servers) if handed is not None else [DEFAULT_SERVERS]


def _connection_from_env() -> ConnectionFile | None:
    path = os.environ.get(CONNECTION_ENV)
    return read_connection_file(Path(path)) if path else None


def _seed_from_env() -> str | None:
    handed = _connection_from_env()
    return handed.nkey_seed if handed is not None else None


def _tls_ca_from_env() -> str | None:
    handed = _connection_from_env()
    return handed.tls_ca if handed is not None else None


def split_servers(servers: str | list[str]) -> list[str]:
    items = servers.split(",") if isinstance(servers, str) else servers
    urls = [item.strip() for item in items if item.strip()]
    if not urls:
        raise ConnectionFailed("no NATS server URL given")
    return urls


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach NATS, and who we are there.

    Who: the first given of ``creds``, a NATS credentials file (default ``$INFERBUS_CREDS``);
    ``nkey``, a file holding an nkey seed (default ``$INFERBUS_NKEY``); ``nkey_seed``, the
    seed itself, as a connection file from ``inferbus roster apply`` carries it (``from_file``;
    default: that of the file ``$INFERBUS_CONNECTION`` names, whose servers and CA are then the
    defaults too). URLs may also carry ``user:password@`` or a token. ``tls_*`` configure TLS
    (``tls://`` URLs use it too)."""

    servers: list[str] = field(default_factory=default_servers)
    name: str = "inferbus"
    creds: str | None = field(default_factory=lambda: os.environ.get(CREDS_ENV))
    nkey: str | None = field(default_factory=lambda: os.environ.get(NKEY_ENV))
    nkey_seed: str | None = field(default_factory=_seed_from_env, repr=False)
    tls_ca: str | None = field(default_factory=_tls_ca_from_env)
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: int = 2  # seconds; nats-py takes whole seconds
    #: try servers in the given order (True shuffles them, spreading load over a cluster)
    randomize: bool = True

    @classmethod
    def from_file(cls, path: str | Path, **settings: Any) -> ConnectOptions:
        """Options from a connection file (``inferbus roster apply`` writes one per identity);
        ``settings`` (``name=``, ``servers=`` ...) override or add to what it says."""
        handed = read_connection_file(Path(path))
        values: dict[str, Any] = {"servers": list(handed.servers), "nkey_seed": handed.nkey_seed}
        values |= {"creds": None, "nkey": None, "tls_ca": handed.tls_ca}
        return cls(**(values | settings))

    @classmethod
    def given(
        cls,
        servers: str | Sequence[str] | None = None,
        *,
        connection: str | Path | None = None,
        creds: str | None = None,
        nkey: str | None = None,
        **settings: Any,
    ) -> ConnectOptions:
        """Options from what a caller gave (None: not given), the rest from the environment.
        At most one identity (``connection`` file, ``creds``, ``nkey``); one given replaces
        any the environment names. ``settings``: other fields (``name``, ``tls_*`` ...)."""
        identities = {"connection": connection, "creds": creds, "nkey": nkey}
        chosen = [key for key, value in identities.items() if value is not None]
        if len(chosen) > 1:
            raise ConfigError(f"give one identity, not {' and '.join(chosen)}")
        values = {key: value for key, value in settings.items() if value is not None}
        if servers is not None:
            values["servers"] = split_servers(servers if isinstance(servers, str) else [*servers])
        if connection is not None:
            return cls.from_file(connection, **values)
        if chosen:
            identity = {chosen[0]: identities[chosen[0]]}
            values |= dict.fromkeys(("creds", "nkey", "nkey_seed")) | identity
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """nats-py's ``connect`` arguments for the one identity these options use."""
        if self.creds:
            return {"user_credentials": self.creds}
        if self.nkey:
            check_seed_file(Path(self.nkey))
            return {"nkeys_seed": self.nkey}
        if self.nkey_seed:
            return {"nkeys_seed_str": self.nkey_seed}
        return {}

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


class _DropLog:
    """nats-py reports every message it drops (its subscription's pending limit) separately,
    from its read loop: a line each would slow that loop down exactly when it is behind."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.dropped = 0
        self.logged_at = 0.0

    def count(self, exc: Exception) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self.logged_at >= self.every_s:
            log.warning("NATS: %d messages dropped by a slow subscription (last: %s)",
                        self.dropped, exc)  # fmt: skip
            self.dropped, self.logged_at = 0, now


async def _log_error(exc: Exception, drops: _DropLog) -> None:
    # Slow-consumer drops and server errors matter; refused connects during start-up do not.
    if isinstance(exc, nats_error_types.SlowConsumerError):
        drops.count(exc)
    else:
        log.debug("NATS: %s", exc)


async def _log_disconnect() -> None:
    log.debug("NATS: disconnected")


async def _log_reconnect() -> None:
    log.info("NATS: reconnected")


def _failure(servers: list[str], errors: list[Exception]) -> ConnectionFailed:
    """Why connecting failed: a refused identity, if a server said so (the connection reset
    that follows would hide it), else the last error. URLs are shown without their
    credentials: the message may reach logs, or a caller who is not the owner."""
    where = ", ".join(redacted(url) for url in servers)
    refusals = [e for e in errors if "authorization violation" in str(e).lower()]
    if refusals:
        return IdentityRefused(
            f"cannot reach NATS at {where}: {refusals[-1]} (the server does not accept this "
            "identity)"
        )
    cause = str(errors[-1]) if errors else "no answer in time"
    return ConnectionFailed(f"cannot reach NATS at {where}: {cause}")


def redacted(url: str) -> str:
    """``url`` with any ``user:password@`` or token replaced by ``***@``."""
    scheme, sep, rest = url.rpartition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


async def connect_nats(
    options: ConnectOptions, on_closed: Callable[[], Awaitable[None]] | None = None
) -> NatsClient:
    """A connected client; ``ConnectionFailed`` when no server answers in time.

    ``on_closed`` runs if the connection closes for good (e.g. the server refused it)."""
    client = NatsClient()
    errors: list[Exception] = []  # while connecting only: they explain a failure
    hopeless = asyncio.Event()  # a certificate that does not verify will not verify next time
    drops = _DropLog()

    async def remember(exc: Exception) -> None:
        if not client.is_connected:
            errors.append(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            hopeless.set()
        await _log_error(exc, drops)

    attempt = client.connect(
        servers=options.servers,
        name=options.name,
        tls=options.tls_context(),
        connect_timeout=options.connect_timeout,
        dont_randomize=not options.randomize,
        allow_reconnect=True,
        # Give up quickly on the first connect; reconnect forever once connected (below).
        max_reconnect_attempts=INITIAL_ATTEMPTS,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # annotated int; any float works
        pending_size=PENDING_SIZE,
        error_cb=remember,
        disconnected_cb=_log_disconnect,
        reconnected_cb=_log_reconnect,
        closed_cb=on_closed,
        **options.identity(),
    )
    # nats-py can hang after a failed TLS handshake instead of trying the next server.
    limit = (options.connect_timeout + 0.5) * (INITIAL_ATTEMPTS + 1) * len(options.servers)
    connecting = asyncio.ensure_future(attempt)
    giving_up = asyncio.ensure_future(hopeless.wait())
    await asyncio.wait({connecting, giving_up}, timeout=limit, return_when="FIRST_COMPLETED")
    giving_up.cancel()
    if not connecting.done() or connecting.exception() is not None:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        # nats-py's close can itself fail after some refused connects (a malformed seed): the
        # connect's failure is the one to report.
        with contextlib.suppress(Exception):
            await client.close()
        raise _failure(options.servers, errors)
    # nats-py reads this option on every reconnect: a live process never gives up on its cluster.
    client.options["max_reconnect_attempts"] = -1
    return client


async def confirm_subscriptions(nats: NatsClient) -> None:
    """Return once the server has seen every SUB sent so far.

    nats-py writes a flush's PING straight to the socket, ahead of SUBs still queued for its
    flusher task, so one PONG does not prove the SUBs arrived. By the time that PONG is read
    the flusher has written its queue, so a second PING follows the SUBs."""
    await nats.flush()
    await nats.flush()
