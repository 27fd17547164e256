"""The command line's shared-bus parts: ``inferbus roster check|apply``, and the server flags
(``--roster``, ``--state``, TLS, JetStream) that ``inferbus server`` and ``inferbus up`` share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from inferbus.errors import ConfigError
from inferbus.natsserver import DEFAULT_PORT, default_store_dir
from inferbus.pipeline.connection import ConnectOptions
from inferbus.roster import Roster
from inferbus.tenancy.credentials import Identity, identities
from inferbus.tenancy.live import RosterServer
from inferbus.tenancy.settings import ServerSettings
from inferbus.tenancy.state import (
    ACCOUNTS_NAME,
    STORE_NAME,
    apply_roster,
    default_state,
    load_checked,
)
from inferbus.tenancy.summary import describe

ROSTER_HELP = "the roster: a TOML file of admins, workers, groups and users (docs/SECURITY.md)"
STATE_HELP = (
    "state folder for the server config, seeds and connection files "
    "(default: ROSTER's folder/<roster name>.state; kept private, 0700)"
)


def cmd_roster(args: argparse.Namespace) -> int:
    if args.roster_command == "check":
        return _check(args.roster)
    return _apply(args.roster, args.state or default_state(args.roster))


def _check(path: Path) -> int:
    roster, _ = load_checked(path)
    print(f"{path}: OK")
    print(describe(roster))
    return 0


def _apply(path: Path, state: Path) -> int:
    applied = apply_roster(path, state)
    print(f"nats-server config: {applied.config_path}")
    print(f"accounts only (to include in a config of your own): {state / ACCOUNTS_NAME}")
    for identity in identities(applied.roster):
        print(f"{identity!s:24} {applied.connection_path(identity)}")
    changes = applied.credentials
    if changes.added:
        print(f"new keys for: {', '.join(map(str, changes.added))}")
    if changes.removed:
        print(f"keys deleted for: {', '.join(map(str, changes.removed))}")
    print(
        "Give each identity its own connection file (it holds that identity's secret key):\n"
        f"  inferbus worker REPO --roster {path} --connection {state}/workers/<name>.toml\n"
        f"  INFERBUS_CONNECTION={state}/users/<name>.toml python app.py\n"
        f"Run the server: inferbus server --roster {path} --state {state}"
    )
    return 0


def roster_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="roster_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="validate a roster and summarise it",
        description="Validate a roster and print its admins, workers, groups, and each user's "
        "grants and quotas. Exits 1, saying what is wrong, if the roster is invalid.",
    )
    check.add_argument("roster", type=Path, metavar="ROSTER", help=ROSTER_HELP)
    apply = actions.add_parser(
        "apply",
        help="write the server config, seeds and connection files",
        description="Write, into the state folder, the nats-server config (an account per user, "
        "public keys only), a secret key per identity (kept across re-applies; deleted for "
        "identities no longer in the roster) and a connection file per identity to hand out. "
        "Prints where each file is, never a key. Run it as the user that runs nats-server: "
        "the files are readable by their owner only.",
    )
    apply.add_argument("roster", type=Path, metavar="ROSTER", help=ROSTER_HELP)
    apply.add_argument("--state", type=Path, help=STATE_HELP)


# --- inferbus server / up -----------------------------------------------------------------------


def server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "server", "Flags override the roster's [server] table, which overrides the defaults."
    )
    group.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, help=f"client port (default {DEFAULT_PORT})")
    group.add_argument(
        "--max-payload", type=int,
        help="largest message in bytes (default 8 MiB; NATS caps it at 64 MiB)",
    )  # fmt: skip
    group.add_argument(
        "--tls-cert", type=Path, help="server certificate (PEM): clients must then use TLS"
    )
    group.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    group.add_argument(
        "--tls-ca", type=Path,
        help="CA (PEM) that signs --tls-cert, when private: written into connection files, and "
        "what `up`'s worker checks the certificate with",
    )  # fmt: skip
    jetstream_options(group)
    shared = parser.add_argument_group(
        "shared bus", "Accounts, keys, grants and quotas from a roster (docs/SECURITY.md)."
    )
    shared.add_argument("--roster", type=Path, help=f"{ROSTER_HELP}; applied again on change")
    shared.add_argument("--state", type=Path, help=STATE_HELP)


def jetstream_options(group: argparse._ActionsContainer, default: str = "") -> None:
    """``--store-dir`` and ``--no-jetstream``: where the model store lives, or none;
    ``default`` says where without ``--store-dir``."""
    default = default or f"{default_store_dir()}; with --roster STATE/{STORE_NAME}"
    group.add_argument(
        "--store-dir", type=Path,
        help="where JetStream keeps the model store (`inferbus deploy`) across restarts "
        f"(default {default})",
    )  # fmt: skip
    group.add_argument(
        "--no-jetstream", dest="jetstream", action="store_false", default=None,
        help="run without JetStream: no model store, so `inferbus deploy` cannot be used",
    )  # fmt: skip


def _server_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The server flags as given (None: not given, so the roster or the default decides)."""
    keys = ("host", "port", "max_payload", "tls_cert", "tls_key", "tls_ca", "jetstream",
            "store_dir")  # fmt: skip
    return {key: getattr(args, key) for key in keys}


def open_settings(args: argparse.Namespace) -> ServerSettings:
    """The settings of a server without a roster (an open bus)."""
    for flag in ("state", "worker"):
        if getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag} goes with --roster")
    settings = ServerSettings().overridden(**_server_flags(args))
    if settings.jetstream and settings.store_dir is None:
        return settings.overridden(store_dir=default_store_dir())
    return settings


def roster_server(args: argparse.Namespace, *, monitor_port: int | None = None) -> RosterServer:
    """The server ``--roster`` describes, its roster applied to ``--state`` (not started)."""
    state = args.state or default_state(args.roster)
    return RosterServer(args.roster, state, monitor_port=monitor_port, **_server_flags(args))


def worker_options(running: RosterServer, wanted: str | None) -> ConnectOptions:
    """How ``up``'s worker connects: as worker ``wanted`` (default: the roster's first)."""
    applied = running.applied
    seed = applied.credentials.seed_path(_worker_identity(running.roster, applied.roster, wanted))
    tls_ca = None if applied.settings.tls_ca is None else str(applied.settings.tls_ca)
    return ConnectOptions(servers=[running.server.url], name="inferbus-worker", creds=None,
                          nkey=str(seed), nkey_seed=None, tls_ca=tls_ca)  # fmt: skip


def _worker_identity(path: Path, roster: Roster, wanted: str | None) -> Identity:
    if not roster.workers:
        raise ConfigError(f"{path} names no worker for `up` to serve as: add [workers.<name>]")
    name = wanted or roster.workers[0]
    if name not in roster.workers:
        raise ConfigError(f"{path} names no worker {name!r}; it has {list(roster.workers)}")
    return Identity("worker", name)
