"""The nats-server ``accounts`` block a roster makes: who may connect, and what each may do.

- ``INFERBUS`` holds the workers and the admins, and exports the model, transfer and
  discovery subjects as services.
- Every user has an account of their own, named after them, that imports those services with
  ``share: true``: the server then writes ``Nats-Request-Info`` (``"acc": "<user>"``) on each
  request, which is how a worker knows who asks. Users never see each other's traffic.
- Identities are nkeys: the config lists public keys only, so it holds no secret.
- Workers may publish only replies (one per request) and their own inbox; users may publish
  requests and subscribe only to inboxes. Grants and quotas are the workers' to enforce (403,
  429), so a user imports every model subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from inferbus.contract import NAME_PATTERN, PREFIX
from inferbus.errors import ConfigError
from inferbus.natsserver import quote
from inferbus.roster import WORKERS_ACCOUNT, Roster
from inferbus.tenancy.credentials import Identity, identities
from inferbus.tenancy.keys import check_public_key

INBOXES: Final = "_INBOX.>"
DISCOVERY: Final = "$SRV.>"
MODEL_SUBJECTS: Final = f"{PREFIX}.>"
TRANSFER_SUBJECTS: Final = "inferbus.transfer.>"

#: what the workers' account offers every user account (discovery answers come from many)
EXPORTS: Final[tuple[Mapping[str, Any], ...]] = (
    {"service": MODEL_SUBJECTS},
    {"service": TRANSFER_SUBJECTS},
    {"service": DISCOVERY, "response_type": "stream"},
)
WORKER_PERMISSIONS: Final[Mapping[str, Any]] = {
    # Their own inbox only (the liveness check); replies are allowed by allow_responses.
    "publish": {"allow": [INBOXES]},
    "subscribe": {"allow": ["inferbus.>", DISCOVERY, INBOXES]},
    # One reply to each message received, to its reply subject: a worker answers, never asks.
    "allow_responses": True,
}
USER_PERMISSIONS: Final[Mapping[str, Any]] = {
    "publish": {"allow": [MODEL_SUBJECTS, TRANSFER_SUBJECTS, DISCOVERY, INBOXES]},
    "subscribe": {"allow": [INBOXES]},
}


def check_servable(roster: Roster) -> None:
    """A roster must name someone: a server without users would let anyone in."""
    if not identities(roster):
        raise ConfigError("the roster names no admin, worker or user: nobody could connect")


def accounts_config(roster: Roster, keys: Mapping[Identity, str]) -> str:
    """The ``accounts { ... }`` block for ``roster``, each identity known by ``keys[identity]``."""
    check_servable(roster)
    everyone = identities(roster)
    missing = [str(identity) for identity in everyone if identity not in keys]
    if missing:
        raise ConfigError(f"no public key for {missing}")
    staff = [i for i in everyone if i.kind != "user"]
    lines = ["accounts {", "  # workers and admins; users reach the models through its exports"]
    lines += _account(WORKERS_ACCOUNT, [_entry(i, keys[i]) for i in staff], "exports", EXPORTS)
    imports = [
        {"service": {"account": WORKERS_ACCOUNT, "subject": export["service"]}, "share": True}
        for export in EXPORTS
    ]
    for user in (i for i in everyone if i.kind == "user"):
        lines += _account(user.name, [_entry(user, keys[user])], "imports", imports)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _entry(identity: Identity, key: str) -> tuple[str, Mapping[str, Any]]:
    """A ``users`` entry, and the comment that says whose it is."""
    entry: dict[str, Any] = {"nkey": check_public_key(key)}
    if identity.kind == "worker":
        entry["permissions"] = WORKER_PERMISSIONS
    elif identity.kind == "user":
        entry["permissions"] = USER_PERMISSIONS
    return str(identity), entry  # admins: no permissions block, everything in INFERBUS


def _account(
    name: str,
    users: Sequence[tuple[str, Mapping[str, Any]]],
    services_key: str,
    services: Sequence[Mapping[str, Any]],
) -> list[str]:
    if not NAME_PATTERN.fullmatch(name):  # the roster checked; an account name is a token
        raise ConfigError(f"account name {name!r} must match [A-Za-z0-9_-]+")
    lines = [f"  {quote(name)}: {{", "    users: ["]
    for comment, entry in users:
        lines += [f"      # {comment}", f"      {conf_value(entry)}"]
    lines += ["    ]", f"    {services_key}: ["]
    lines += [f"      {conf_value(service)}" for service in services]
    return [*lines, "    ]", "  }"]


def conf_value(value: Any) -> str:
    """``value`` (maps, lists, strings, booleans, integers) in nats-server config syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, list | tuple):
        return f"[{', '.join(conf_value(item) for item in value)}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)}: {conf_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no nats-server config syntax for {type(value).__name__}")


def _key(key: str) -> str:
    if not key.replace("_", "").isalpha():
        raise ConfigError(f"{key!r} is not a nats-server config key")
    return key
