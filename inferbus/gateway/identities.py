"""Whose NATS identity a request travels under: the gateway's own (an open bus), or, with
``--per-user``, the caller's — HTTP basic credentials handed to nats-server, which checks them.
Never one privileged connection for everyone: that would erase who asked (docs/GATEWAY.md)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from inferbus.errors import ConnectionFailed, InferbusError
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.discovery import Directory
from inferbus.pipeline.transport import Transport

MAX_USERS: Final = 1024  # connections kept open at once in the per-user mode
_NOT_IN_URLS: Final = frozenset("@/?#% \t\r\n")


class Unauthenticated(InferbusError):
    """No credentials, or nats-server refused them: HTTP 401."""


@dataclass(frozen=True, slots=True)
class Session:
    """One NATS identity's connection, and discovery as that identity sees it."""

    transport: Transport
    directory: Directory


class Identities(Protocol):
    """Picks the session a request is sent through."""

    async def session(self, authorization: str | None) -> Session: ...

    def connected(self) -> bool: ...

    async def close(self) -> None: ...


class OneIdentity:
    """Every request as the gateway's own identity (its connection flags)."""

    def __init__(self, transport: Transport) -> None:
        self._session = Session(transport, Directory(transport.nats))

    async def session(self, authorization: str | None) -> Session:
        return self._session

    def connected(self) -> bool:
        return bool(self._session.transport.nats.is_connected)

    async def close(self) -> None:
        await self._session.transport.close()


class PerUser:
    """Each caller as themself: HTTP basic ``user:password`` becomes the NATS URL's user and
    password (or, when the password is an nkey seed ``SU…``, that seed), one connection per
    credential pair, opened on its first request. The gateway holds no identity of its own."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self._sessions: dict[bytes, Session] = {}
        self._lock = asyncio.Lock()

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
                if len(self._sessions) >= MAX_USERS:
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
