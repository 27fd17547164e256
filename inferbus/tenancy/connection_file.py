"""The connection file an identity is handed: where the bus is, and the key to it.

TOML, written by ``inferbus roster apply`` (mode 0600) and read by ``--connection FILE``,
``$INFERBUS_CONNECTION`` and ``ConnectOptions.from_file``::

    # inferbus connection for user alice. It holds alice's secret key: keep it private.
    servers = ["nats://lab.example.org:4222"]
    nkey_seed = "SUA..."
    tls_ca = "/etc/inferbus/ca.pem"   # only when the server's certificate has a private CA

A relative ``tls_ca`` is relative to the file's folder.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from inferbus.errors import ConfigError
from inferbus.tenancy.keys import public_key

_KEYS: Final = frozenset({"servers", "nkey_seed", "tls_ca"})


@dataclass(frozen=True, slots=True)
class ConnectionFile:
    servers: tuple[str, ...]
    nkey_seed: str = field(repr=False)  # the secret: never in a repr, a log or an error
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            raise ConfigError("servers is a non-empty list of NATS URLs")
        public_key(self.nkey_seed)  # a broken seed fails here, not at connect time

    def text(self, heading: str) -> str:
        """The file's contents, under a comment line ``heading``."""
        lines = [f"# {heading}", f"servers = [{', '.join(map(_toml_string, self.servers))}]"]
        lines.append(f"nkey_seed = {_toml_string(self.nkey_seed)}")
        if self.tls_ca is not None:
            lines.append(f"tls_ca = {_toml_string(self.tls_ca)}")
        return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    # JSON's escapes are TOML's for printable text; control characters are refused instead.
    if not value.isprintable():
        raise ConfigError(f"{value!r} cannot be written into a connection file")
    return json.dumps(value, ensure_ascii=False)


def check_seed_file(path: Path) -> None:
    """``path`` holds an nkey user seed (as ``--nkey`` and ``$INFERBUS_NKEY`` name one), or a
    ``ConfigError`` says what is wrong — before nats-py would fail with less to say."""
    try:
        public_key(Path(path).read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the nkey seed: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_connection_file(path: Path) -> ConnectionFile:
    """Read and check a connection file; a ``ConfigError`` names the file, never the seed."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        return _parse(raw, Path(path).parent)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the connection file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse(raw: dict[str, Any], folder: Path) -> ConnectionFile:
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; known: {sorted(_KEYS)}")
    servers = raw.get("servers")
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list):
        raise ConfigError("servers is a list of NATS URLs")
    seed = raw.get("nkey_seed")
    if not isinstance(seed, str):
        raise ConfigError("nkey_seed (the identity's secret key, SU...) is missing")
    tls_ca = raw.get("tls_ca")
    if tls_ca is not None and not isinstance(tls_ca, str):
        raise ConfigError("tls_ca is the path of a CA bundle (PEM)")
    return ConnectionFile(
        tuple(servers), seed, None if tls_ca is None else str(folder / Path(tls_ca).expanduser())
    )
