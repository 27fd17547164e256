"""NATS user keys. A seed (``SU...``) is the secret a connection signs the server's challenge
with; its public key (``U...``) is all the server's configuration holds. A typed edge around
the untyped ``nkeys`` package that nats-py uses."""

from __future__ import annotations

import re
from typing import Final

import nacl.signing
import nkeys  # type: ignore[import-untyped]

from inferbus.errors import ConfigError

_USER_SEED: Final = re.compile(r"SU[A-Z2-7]{56}")
_USER_KEY: Final = re.compile(r"U[A-Z2-7]{55}")


def new_user_seed() -> str:
    raw = bytes(nacl.signing.SigningKey.generate())
    return str(nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER).decode())


def public_key(seed: str) -> str:
    """The public key of a user seed; ``ConfigError`` (never showing the seed) if it is not one."""
    if not _USER_SEED.fullmatch(seed):
        raise ConfigError("not an nkey user seed (58 characters, starting with SU)")
    try:
        pair = nkeys.from_seed(bytearray(seed.encode()))
        key = str(pair.public_key.decode())
    except (nkeys.NkeysError, ValueError):
        raise ConfigError("not a valid nkey user seed") from None
    pair.wipe()
    return check_public_key(key)


def check_public_key(key: str) -> str:
    if not _USER_KEY.fullmatch(key):
        raise ConfigError(f"{key!r} is not an nkey user public key (U...)")
    return key
