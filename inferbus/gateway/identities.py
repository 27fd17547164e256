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
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from inferbus.errors import ConnectionFailed, InferbusError
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.discovery import Directory
from inferbus.pipeline.transport import Transport

MAX_USERS: Final = 1024  # connections kept open at once in the per-user mode
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


class Identities(Protocol):
    """Picks the session a request is sent through."""

    def using(self, authorization: str | None) -> contextlib.AbstractAsyncContextManager[Session]:
        """The session, marked in use until the block ends (idle ones may be closed)."""
        ...

    def connected(self) -> bool: ...

    async def close(self) -> None: ...


class OneIdentity:
    """Every request as the gateway's own identity (its connection flags)."""

    def __init__(self, transport: Transport) -> None:
        self._session = Session(transport, Directory(transport.nats))

    @contextlib.asynccontextmanager
    async def using(self, authorization: str | None) -> AsyncIterator[Session]:
        yield self._session

    def connected(self) -> bool:
        return bool(self._session.transport.nats.is_connected)

    async def close(self) -> None:
        await self._session.transport.close()


class PerUser:
    """Each caller as themself: HTTP basic ``user:password`` becomes the NATS URL's user and
    password (or, when the password is an nkey seed ``SU…``, that seed), one connection per
    credential pair, opened on its first request and closed after ``idle_close_s`` with no
    request (looked for as requests arrive). The gateway holds no identity of its own."""

    def __init__(self, options: ConnectOptions, *, idle_close_s: float = IDLE_CLOSE_S) -> None:
        self.options = options
        self.idle_close_s = idle_close_s
        self._sessions: dict[bytes, Session] = {}
        self._lock = asyncio.Lock()
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
            await session.transport.close()
        return len(closing)

    async def session(self, authorization: str | None) -> Session:
        user, password = basic_credentials(authorization)
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        found = self._sessions.get(key)
        if found is not None and not found.transport.nats.is_closed:
            return found
        async with self._lock:  # one connect per new identity; known ones never wait here
            found = self._sessions.get(key)
            if found is None or found.transport.nats.is_closed:  # new, or cut off since
                if found is not None:
                    del self._sessions[key]
                    await found.transport.close()
                if len(self._sessions) >= MAX_USERS and not await self.close_idle():
                    raise ConnectionFailed(f"the gateway holds {MAX_USERS} users' connections")
                found = await self._open(user, password)
                self._sessions[key] = found
        return found

    async def _open(self, user: str, password: str) -> Session:
        if password.startswith("SU"):
            options = dataclasses.replace(self.options, creds=None, nkey=None, nkey_seed=password)
        else:
            servers = [_with_user(url, user, password) for url in self.options.servers]
            options = dataclasses.replace(
                self.options, servers=servers, creds=None, nkey=None, nkey_seed=None
            )
        try:
            transport = await Transport.open(options)
        except (ConnectionFailed, ValueError) as exc:
            raise Unauthenticated(f"nats-server did not accept {user!r}: {exc}") from None
        return Session(transport, Directory(transport.nats))

    def connected(self) -> bool:
        return True  # each user's connection is judged on their own requests

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.transport.close()


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


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{password}@{host}"  # nats-py reads them from the URL undecoded
    return urlunsplit(parts._replace(netloc=netloc))
