"""The server's own settings: the roster's ``[server]`` table, which command-line flags override.

::

    [server]
    host = "0.0.0.0"                 # listen address (default 127.0.0.1)
    port = 4222
    url = "tls://lab.example.org:4222"   # what connection files point at (a list for a cluster)
    max_payload = 8388608
    tls_cert = "certs/server.pem"    # paths relative to the roster's folder
    tls_key = "certs/server-key.pem"
    tls_ca = "certs/ca.pem"          # handed to clients, when the certificate's CA is private
    jetstream = true                 # the model store (default on)
    store_dir = "/var/lib/inferbus/jetstream"   # where JetStream keeps it

JetStream (the model store, ``inferbus.store``) is on unless ``jetstream = false``. Without a
``store_dir`` it stores in the roster's state folder (``STATE/jetstream``).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from inferbus.errors import ConfigError
from inferbus.natsserver import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_PORT,
    Cluster,
    EmbeddedServer,
    ServerTLS,
)

_PATHS: Final = ("tls_cert", "tls_key", "tls_ca", "store_dir")
_KEYS: Final = frozenset({"host", "port", "url", "max_payload", "jetstream", *_PATHS})
_ANY_ADDRESS: Final = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_payload: int = DEFAULT_MAX_PAYLOAD
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    #: the URLs clients are given; by default made from host, port and TLS
    urls: tuple[str, ...] = ()
    jetstream: bool = True
    store_dir: Path | None = None

    def __post_init__(self) -> None:
        if type(self.port) is not int or not 0 < self.port < 65536:
            raise ConfigError(f"[server] port must be 1-65535, not {self.port!r}")
        if type(self.max_payload) is not int or self.max_payload < 1:
            raise ConfigError("[server] max_payload is a number of bytes >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("[server] TLS needs both tls_cert and tls_key")

    @property
    def tls(self) -> ServerTLS | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return ServerTLS(self.tls_cert, self.tls_key)

    def client_urls(self) -> list[str]:
        if self.urls:
            return list(self.urls)
        # A wildcard address is no place to dial: give clients this machine's name instead.
        host = socket.getfqdn() if self.host in _ANY_ADDRESS else self.host
        return [f"{'tls' if self.tls else 'nats'}://{host}:{self.port}"]

    def server(
        self, accounts: str, monitor_port: int | None = None, *, cluster: Cluster | None = None
    ) -> EmbeddedServer:
        """The nats-server these settings describe, not started."""
        return EmbeddedServer(
            host=self.host,
            port=self.port,
            max_payload=self.max_payload,
            tls=self.tls,
            accounts=accounts,
            cluster=cluster,
            monitor_port=monitor_port,
            jetstream=self.jetstream,
            store_dir=self.store_dir,
        )

    def overridden(self, **flags: Any) -> ServerSettings:
        """These settings with every flag that is not None in its place."""
        given = {name: value for name, value in flags.items() if value is not None}
        for name in _PATHS:
            if name in given:
                given[name] = Path(given[name]).expanduser().resolve()
        return dataclasses.replace(self, **given)


def server_settings(table: Mapping[str, Any], folder: Path) -> ServerSettings:
    """The ``[server]`` table checked; relative paths are relative to ``folder``."""
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"[server]: unknown keys {unknown}; known: {sorted(_KEYS)}")
    values: dict[str, Any] = {}
    for name in _PATHS:
        if name in table:
            values[name] = (folder / Path(_string(name, table[name])).expanduser()).resolve()
    if "host" in table:
        values["host"] = _string("host", table["host"])
    if "url" in table:
        urls = table["url"] if isinstance(table["url"], list) else [table["url"]]
        values["urls"] = tuple(_string("url", url) for url in urls)
    for name in ("port", "max_payload"):
        if name in table:
            values[name] = table[name]
    if "jetstream" in table:
        if not isinstance(table["jetstream"], bool):
            raise ConfigError("[server] jetstream is true or false")
        values["jetstream"] = table["jetstream"]
    return ServerSettings(**values)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"[server] {key} must be a non-empty string")
    return value
