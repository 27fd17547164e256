"""The nats-server ``accounts`` block a roster makes: who may connect, and what each may do.

- ``INFERBUS`` holds the workers and the admins, and exports the model, transfer, model-store
  and discovery subjects as services. It alone has JetStream, which holds the model store
  (``inferbus.store``): admins and workers write it, users deploy through a worker.
- Every user has an account of their own, named after them, that imports those services with
  ``share: true``: the server then writes ``Nats-Request-Info`` (``"acc": "<user>"``) on each
  request, which is how a worker knows who asks. Users never see each other's traffic.
- Identities are nkeys: the config lists public keys only, so it holds no secret.
- Workers may publish only replies (one per request), their own inbox, and what the model
  store's buckets take (never deleting or reconfiguring one); users may publish requests and
  subscribe only to inboxes. Grants and quotas are the workers' to enforce (403, 429), so a
  user imports every model subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from inferbus.contract import NAME_PATTERN, PREFIX
from inferbus.errors import ConfigError
from inferbus.natsserver import quote
from inferbus.roster import WORKERS_ACCOUNT, Roster
from inferbus.store.records import CLAIMS_BUCKET, DEPLOYMENTS_BUCKET, FILES_BUCKET
from inferbus.tenancy.credentials import Identity, identities
from inferbus.tenancy.keys import check_public_key

INBOXES: Final = "_INBOX.>"
DISCOVERY: Final = "$SRV.>"
MODEL_SUBJECTS: Final = f"{PREFIX}.>"
TRANSFER_SUBJECTS: Final = "inferbus.transfer.>"

STORE_SUBJECTS: Final = "inferbus.store.>"  # load on demand, deploy through a worker


def _bucket(stream: str, subjects: str) -> list[str]:
    """What a worker may ask JetStream about one bucket: make it if missing, read it (info, a
    message, the ordered ephemeral consumers of nats-py's KV watch and Object Store get),
    write it (``subjects``) and purge an object's old chunks; never delete or reconfigure it."""
    api = "$JS.API"
    return [f"{api}.STREAM.CREATE.{stream}", f"{api}.STREAM.INFO.{stream}",
            f"{api}.STREAM.MSG.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>",
            f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.INFO.{stream}.*", f"{api}.CONSUMER.DELETE.{stream}.*",
            f"{api}.STREAM.PURGE.{stream}", subjects]  # fmt: skip


#: what a worker may publish to JetStream: the model store's buckets, which workers follow and
#: also write for users who deploy through them (``inferbus.store.service``, after the roster's
#: checks), and the replica claims. Flow-control replies go by ``allow_responses``.
JETSTREAM_SUBJECTS: Final[tuple[str, ...]] = (
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",  # nats-py finds an object's stream by its subject
    *_bucket(f"OBJ_{FILES_BUCKET}", f"$O.{FILES_BUCKET}.>"),
    *_bucket(f"KV_{DEPLOYMENTS_BUCKET}", f"$KV.{DEPLOYMENTS_BUCKET}.>"),
    *_bucket(f"KV_{CLAIMS_BUCKET}", f"$KV.{CLAIMS_BUCKET}.>"),
)

#: what the workers' account offers every user account (discovery answers come from many)
EXPORTS: Final[tuple[Mapping[str, Any], ...]] = (
    {"service": MODEL_SUBJECTS},
    {"service": TRANSFER_SUBJECTS},
    {"service": STORE_SUBJECTS},
    {"service": DISCOVERY, "response_type": "stream"},
)
WORKER_PERMISSIONS: Final[Mapping[str, Any]] = {
    # Their own inbox only (the liveness check), and the model store; replies are allowed by
    # allow_responses.
    "publish": {"allow": [INBOXES, *JETSTREAM_SUBJECTS]},
    "subscribe": {"allow": ["inferbus.>", DISCOVERY, INBOXES]},
    # One reply to each message received, to its reply subject: a worker answers, never asks
    # (JetStream aside).
    "allow_responses": True,
}
USER_PERMISSIONS: Final[Mapping[str, Any]] = {
    # $JS.API.INFO: their account has no JetStream, which the server then says at once (so
    # `inferbus deploy` knows to deploy through a worker without waiting for a timeout).
    "publish": {
        "allow": [
            MODEL_SUBJECTS,
            TRANSFER_SUBJECTS,
            STORE_SUBJECTS,
            DISCOVERY,
            INBOXES,
            "$JS.API.INFO",
        ]
    },
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
    staff_entries = [_entry(i, keys[i]) for i in staff]
    lines += _account(WORKERS_ACCOUNT, staff_entries, "exports", EXPORTS, jetstream=True)
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
    *,
    jetstream: bool = False,
) -> list[str]:
    if not NAME_PATTERN.fullmatch(name):  # the roster checked; an account name is a token
        raise ConfigError(f"account name {name!r} must match [A-Za-z0-9_-]+")
    lines = [
        f"  {quote(name)}: {{",
        *(["    jetstream: enabled"] if jetstream else []),
        "    users: [",
    ]
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
