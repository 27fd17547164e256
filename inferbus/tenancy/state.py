"""A roster applied to a state folder: the server's configuration, the seeds, the files to hand out.

::

    STATE/                        0700, with a .gitignore that keeps it out of version control
      nats-server.conf            a whole server config: no secret (nats-server -c it)
      accounts.conf               its accounts block alone, to include in a config of your own
      admins/<name>.nk  .toml     each identity's seed, and the connection file to hand over
      workers/<name>.nk .toml
      users/<name>.nk   .toml
      jetstream/                  the model store's files, unless [server] or --store-dir say

Applying again keeps every seed, so files already handed out keep working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from inferbus.errors import ConfigError
from inferbus.roster import Roster, load_roster
from inferbus.tenancy import credentials
from inferbus.tenancy._files import write_private
from inferbus.tenancy.connection_file import ConnectionFile
from inferbus.tenancy.credentials import CONNECTION_SUFFIX, Credentials, Identity, identities
from inferbus.tenancy.serverconfig import accounts_config, check_servable
from inferbus.tenancy.settings import ServerSettings, server_settings

CONFIG_NAME = "nats-server.conf"
ACCOUNTS_NAME = "accounts.conf"
STORE_NAME = "jetstream"


@dataclass(frozen=True, slots=True)
class AppliedRoster:
    roster: Roster
    settings: ServerSettings
    credentials: Credentials
    accounts: str  # the nats-server accounts block
    config_path: Path

    @property
    def state(self) -> Path:
        return self.credentials.state

    def connection_path(self, identity: Identity) -> Path:
        return identity.path(self.state, CONNECTION_SUFFIX)


def default_state(roster_path: Path) -> Path:
    """Where a roster's state lives unless told: ``<folder>/<roster name>.state``."""
    return roster_path.parent / f"{roster_path.stem}.state"


def load_checked(roster_path: Path, **flags: object) -> tuple[Roster, ServerSettings]:
    """The roster and its server settings (``[server]``, then the command-line ``flags``;
    None: not given), checked; every ``ConfigError`` names the file."""
    roster = load_roster(roster_path)
    try:
        check_servable(roster)
        settings = server_settings(roster.server, roster_path.parent).overridden(**flags)
        settings.server("").config_text()  # a path the config cannot hold fails here
    except ConfigError as exc:
        raise ConfigError(f"{roster_path}: {exc}") from None
    return roster, settings


def apply_roster(roster_path: Path, state: Path, **flags: object) -> AppliedRoster:
    """Read ``roster_path`` and bring ``state`` in line with it (``flags`` as in ``load_checked``).
    Nothing is written when the roster is wrong (``ConfigError``)."""
    roster, settings = load_checked(roster_path, **flags)
    if settings.jetstream and settings.store_dir is None:
        settings = dataclasses.replace(settings, store_dir=(state / STORE_NAME).resolve())
    keys = credentials.apply(roster, state)
    accounts = accounts_config(roster, keys.public_keys)
    config_path = state / CONFIG_NAME
    write_private(config_path, settings.server(accounts).config_text())
    write_private(state / ACCOUNTS_NAME, accounts)
    write_private(state / ".gitignore", "# seeds and connection files: never commit them\n*\n")
    applied = AppliedRoster(roster, settings, keys, accounts, config_path)
    for identity in identities(roster):
        handed = ConnectionFile(
            tuple(settings.client_urls()),
            keys.seed(identity),
            None if settings.tls_ca is None else str(settings.tls_ca.resolve()),
        )
        text = handed.text(f"inferbus connection for {identity}. It holds a secret key: "
                           "keep it private.")  # fmt: skip
        write_private(applied.connection_path(identity), text)
    return applied
