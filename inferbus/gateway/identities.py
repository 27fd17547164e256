"""Whose NATS identity a request travels under: the gateway's own (an open bus), or, with
``--per-user``, the caller's — HTTP basic credentials handed to nats-server, which checks them.
Never one privileged connection for everyone: that would erase who asked (docs/GATEWAY.md)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import nkeys  # type: ignore[import-untyped]

from inferbus.errors import ConnectionFailed, IdentityRefused, InferbusError
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.discovery import Directory
from inferbus.pipeline.transport import Transport

if TYPE_CHECKING:
    from inferbus.dashboard.app import Dashboard

log = logging.getLogger("inferbus.gateway")

MAX_USERS: Final = 1024  # connections kept open at once in the per-user mode
MAX_OPENING: Final = 64  # new identities' connects under way at once (refusals take a while)
IDLE_CLOSE_S: Final = 300.0  # a user's connection with no request for this long is closed
SWEEP_EVERY_S: Final = 30.0
_NOT_IN_URLS: Final = frozenset("@/?#% \t\r\n")


class Unauthenticated(InferbusError):
    """No credentials, or nats-server refused them: HTTP 401."""


@dataclass(slots=True)
class Session:
    """One NATS identity's connection, and discovery as that identity sees it; ``busy``
    requests use it now, the last one ended at ``last_used`` (monotonic seconds)."""

    transport: Transport
    directory: Directory
    busy: int = 0
    last_used: float = field(default_factory=time.monotonic)
    dashboard: Dashboard | None = None  # this identity's view of the cluster, once asked for
    #: recent discovery answers (the gateway's metadata cache), this identity's own
    lookups: dict[tuple[str, int | None], Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def use(self) -> Iterator[Session]:
        self.busy += 1
        try:
            yield self
        finally:
            self.busy -= 1
            self.last_used = time.monotonic()

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last_used

    async def close(self) -> None:
        if self.dashboard is not None:
            await self.dashboard.close()
        await self.transport.close()


class Identities(Protocol):
    """Picks the session a request is sent through."""

    def using(self, authorization: str | None) -> contextlib.AbstractAsyncContextManager[Session]:
        """The session, marked in use until the block ends (idle ones may be closed)."""
        ...

    def connected(self) -> bool: ...

    def end_streams(self) -> None:
        """The server is stopping: end the dashboards' open event streams now."""
        ...

    async def close(self) -> None: ...


class OneIdentity:
    """Every request as the gateway's own identity (its connection flags)."""

    def __init__(self, transport: Transport) -> None:
        self._session = Session(transport, Directory(transport.nats))
        self._given = _Given(self._session)

    def using(self, authorization: str | None) -> contextlib.AbstractAsyncContextManager[Session]:
        return self._given  # one object for every request: nothing made on the hot path

    def connected(self) -> bool:
        return bool(self._session.transport.nats.is_connected)

    def end_streams(self) -> None:
        return None  # its one dashboard belongs to the server, which ends it

    async def close(self) -> None:
        await self._session.transport.close()


class _Given(contextlib.AbstractAsyncContextManager[Session]):
    """A session that is simply there: entering it gives it, leaving it does nothing."""

    def __init__(self, session: Session) -> None:
        self.session = session

    async def __aenter__(self) -> Session:
        return self.session

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class PerUser:
    """Each caller as themself: HTTP basic ``user:password`` becomes the NATS URL's user and
    password (or, when the password is an nkey seed ``SU…``, that seed), one connection per
    credential pair, opened on its first request and closed after ``idle_close_s`` with no
    request (looked for as requests arrive). The gateway holds no identity of its own."""

    def __init__(self, options: ConnectOptions, *, idle_close_s: float = IDLE_CLOSE_S) -> None:
        self.options = options
        self.idle_close_s = idle_close_s
        self._sessions: dict[bytes, Session] = {}
        self._opening: dict[bytes, asyncio.Future[Session]] = {}
        self._swept = time.monotonic()

    @contextlib.asynccontextmanager
    async def using(self, authorization: str | None) -> AsyncIterator[Session]:
        session = await self.session(authorization)
        with session.use():
            yield session
        if time.monotonic() - self._swept > min(SWEEP_EVERY_S, self.idle_close_s):
            await self.close_idle()

    async def close_idle(self) -> int:
        """Closes the connections idle for ``idle_close_s``; how many."""
        self._swept = now = time.monotonic()
        idle = [key for key, s in self._sessions.items() if s.idle_for(now) >= self.idle_close_s]
        closing = [self._sessions.pop(key) for key in idle]
        for session in closing:
            await session.close()
        return len(closing)

    async def session(self, authorization: str | None) -> Session:
        """The caller's session: a known one at once; a new identity's connection opened once
        (concurrent first requests wait for the same connect), without holding up others'."""
        key, options, who = self._identity(authorization)
        found = self._sessions.get(key)
        if found is not None and not found.transport.nats.is_closed:
            return found
        opening = self._opening.get(key)
        if opening is None:
            if found is not None:  # cut off since (the server reloaded, say)
                del self._sessions[key]
                await found.close()
            if len(self._opening) >= MAX_OPENING:
                raise ConnectionFailed(f"{MAX_OPENING} logins are in progress; try again")
            if len(self._sessions) >= MAX_USERS and not await self.close_idle():
                raise ConnectionFailed(f"the gateway holds {MAX_USERS} users' connections")
            opening = asyncio.ensure_future(self._open(key, options, who))
            self._opening[key] = opening
        # shielded: one caller going away must not cancel the connect others wait for
        return await asyncio.shield(opening)

    def _identity(self, authorization: str | None) -> tuple[bytes, ConnectOptions, str]:
        """The session key, the options to connect with, and who it is (for logs). Only the
        caller's credentials travel: the gateway's own URL credentials, credentials files
        and TLS client certificate are dropped, or anyone could borrow them."""
        user, password = basic_credentials(authorization)
        base = dataclasses.replace(
            self.options,
            servers=[_with_user(url, None, None) for url in self.options.servers],
            creds=None, nkey=None, nkey_seed=None, tls_cert=None, tls_key=None,
        )  # fmt: skip
        if password.startswith("SU"):
            try:
                public = nkeys.from_seed(password.encode()).public_key.decode()
            except Exception:  # nkeys raises several kinds on a malformed seed
                raise Unauthenticated("the password is not a valid nkey seed") from None
            # keyed by the key alone: one seed under many user names is one connection
            return f"nkey:{public}".encode(), dataclasses.replace(base, nkey_seed=password), public
        digest = hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()
        servers = [_with_user(url, user, password) for url in base.servers]
        return f"user:{digest}".encode(), dataclasses.replace(base, servers=servers), user

    async def _open(self, key: bytes, options: ConnectOptions, who: str) -> Session:
        try:
            transport = await Transport.open(options)
        except IdentityRefused:
            log.info("nats-server refused the credentials of %r", who)
            raise Unauthenticated("nats-server did not accept these credentials") from None
        except ConnectionFailed as exc:
            log.warning("cannot reach NATS for %r: %s", who, exc)
            raise ConnectionFailed("the gateway cannot reach NATS") from None
        except Exception as exc:  # nats-py's own errors for odd credentials
            log.info("nats-server did not accept %r: %s", who, type(exc).__name__)
            raise Unauthenticated("nats-server did not accept these credentials") from None
        finally:
            self._opening.pop(key, None)
        session = Session(transport, Directory(transport.nats))
        self._sessions[key] = session
        return session

    def connected(self) -> bool:
        return True  # each user's connection is judged on their own requests

    def end_streams(self) -> None:
        for session in self._sessions.values():
            if session.dashboard is not None:
                session.dashboard.end_streams()

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


def basic_credentials(authorization: str | None) -> tuple[str, str]:
    """``user, password`` from an ``Authorization: Basic …`` header; Unauthenticated if none."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated("HTTP basic authentication is required")
    try:
        user, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed basic credentials") from None
    if not colon or not user:
        raise Unauthenticated("basic credentials need a user and a password")
    if any(char in _NOT_IN_URLS for char in user + password) or ":" in user:
        raise Unauthenticated("basic credentials may not hold whitespace or any of @/?#%")
    return user, password


def _with_user(url: str, user: str | None, password: str | None) -> str:
    """``url`` with ``user:password@`` (replacing any there), or with none when ``user`` is
    None."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.netloc.rpartition("@")[2]
    netloc = host if user is None else f"{user}:{password}@{host}"  # nats-py: undecoded
    return urlunsplit(parts._replace(netloc=netloc))
