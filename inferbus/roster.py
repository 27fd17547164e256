"""The roster: who may use a shared bus, which models each may call, and how much.

A TOML file that a class or a lab keeps (docs/SECURITY.md walks through one)::

    [admins.teacher]                 # everything: serve, call, watch

    [workers.gpu1]                   # a model end's identity (serves; publishes only replies)

    [groups.class]
    models = ["digits", "ocr-*"]     # model names, or fnmatch patterns; "*" grants all
    rate = 20                        # requests per second per user, at each worker
    burst = 40                       # requests a user may send at once (default: rate, >= 1)
    rows_in_flight = 256             # rows a user may have queued or running, at each worker

    [users.alice]
    groups = ["class"]
    models = ["embeddings"]          # grants beyond the groups'
    rate = 50                        # a user's own value overrides the groups'

From it ``inferbus`` generates the nats-server configuration (an account per user, the
workers' account exporting the model subjects) and each identity's credentials; workers read
it for grants and quotas. Quotas hold at each worker process: a model served by three workers
admits up to three times a user's ``rate``.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from inferbus.contract import NAME_PATTERN
from inferbus.errors import ConfigError

#: the account the workers and admins live in, and nats-server's system account
WORKERS_ACCOUNT: Final = "INFERBUS"
SYSTEM_ACCOUNT: Final = "SYS"
RESERVED_NAMES: Final = frozenset({WORKERS_ACCOUNT.lower(), SYSTEM_ACCOUNT.lower(), "$g"})
_SECTIONS: Final = frozenset({"admins", "workers", "groups", "users", "server"})
_QUOTA_KEYS: Final = frozenset({"rate", "burst", "rows_in_flight"})


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-user limits at each worker; None: no limit."""

    rate: float | None = None  # requests per second
    burst: int = 1  # the token bucket's depth
    rows_in_flight: int | None = None

    @property
    def limited(self) -> bool:
        return self.rate is not None or self.rows_in_flight is not None


UNLIMITED: Final = Quota()


@dataclass(frozen=True, slots=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # grants: names or fnmatch patterns
    quota: Quota = UNLIMITED

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True, slots=True)
class Roster:
    users: Mapping[str, User] = field(default_factory=dict)
    admins: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()
    #: the ``[server]`` table as written (host, port, url, tls ...), for the config generator
    server: Mapping[str, Any] = field(default_factory=dict)

    def user(self, name: str) -> User | None:
        return self.users.get(name)

    def allows(self, user: str, model: str) -> bool:
        """May ``user`` call ``model``? Unknown users may call nothing."""
        known = self.users.get(user)
        return known is not None and known.may_use(model)

    def quota(self, user: str) -> Quota:
        known = self.users.get(user)
        return known.quota if known is not None else UNLIMITED


def load_roster(path: Path) -> Roster:
    """Read and check a roster file; a ConfigError names the file and what is wrong."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the roster: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_roster(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_roster(raw: Mapping[str, Any]) -> Roster:
    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        raise ConfigError(f"unknown sections {unknown}; known: {sorted(_SECTIONS)}")
    admins = tuple(_table(raw, "admins"))
    workers = tuple(_table(raw, "workers"))
    groups = {name: _group(name, value) for name, value in _table(raw, "groups").items()}
    users = {name: _user(name, value, groups) for name, value in _table(raw, "users").items()}
    seen: dict[str, str] = {}
    for kind, names in (("admin", admins), ("worker", workers), ("user", tuple(users))):
        for name in names:
            _check_name(kind, name)
            if name.lower() in seen:
                raise ConfigError(f"{kind} {name!r} has the name of {seen[name.lower()]}")
            seen[name.lower()] = f"{kind} {name!r}"
    server = raw.get("server", {})
    if not isinstance(server, Mapping):
        raise ConfigError("[server] must be a table")
    return Roster(users=users, admins=admins, workers=workers, server=dict(server))


def _table(raw: Mapping[str, Any], section: str) -> dict[str, Mapping[str, Any]]:
    value = raw.get(section, {})
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ConfigError(f"[{section}] holds tables, one per name: [{section}.<name>]")
    return dict(value)


def _check_name(kind: str, name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{kind} name {name!r} must match [A-Za-z0-9_-]+")
    if name.lower() in RESERVED_NAMES:
        raise ConfigError(f"{kind} name {name!r} is reserved")


@dataclass(frozen=True, slots=True)
class _Group:
    models: tuple[str, ...]
    limits: Mapping[str, Any]


def _models(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: models is a list of model names or patterns")
    return tuple(value)


def _limits(where: str, table: Mapping[str, Any]) -> dict[str, Any]:
    limits = {key: table[key] for key in _QUOTA_KEYS if key in table}
    rate = limits.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                             or rate <= 0):  # fmt: skip
        raise ConfigError(f"{where}: rate is a number of requests per second > 0")
    for key in ("burst", "rows_in_flight"):
        value = limits.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ConfigError(f"{where}: {key} is an integer >= 1")
    return limits


def _group(name: str, table: Mapping[str, Any]) -> _Group:
    where = f"[groups.{name}]"
    unknown = sorted(set(table) - _QUOTA_KEYS - {"models"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    return _Group(_models(where, table.get("models", [])), _limits(where, table))


def _user(name: str, table: Mapping[str, Any], groups: Mapping[str, _Group]) -> User:
    where = f"[users.{name}]"
    unknown = sorted(set(table) - _QUOTA_KEYS - {"models", "groups"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    member_of = table.get("groups", [])
    if not isinstance(member_of, list) or not all(isinstance(g, str) for g in member_of):
        raise ConfigError(f"{where}: groups is a list of group names")
    missing = sorted(set(member_of) - set(groups))
    if missing:
        raise ConfigError(f"{where}: no such groups {missing}")
    models = list(_models(where, table.get("models", [])))
    for group in member_of:
        models += [m for m in groups[group].models if m not in models]
    own = _limits(where, table)
    return User(name, tuple(member_of), tuple(models),
                _quota(own, [groups[g].limits for g in member_of]))  # fmt: skip


def _quota(own: Mapping[str, Any], group_limits: list[Mapping[str, Any]]) -> Quota:
    """The user's own value for each limit, else the most generous of their groups'."""

    def pick(key: str) -> Any:
        if key in own:
            return own[key]
        values = [limits[key] for limits in group_limits if key in limits]
        return max(values) if values else None

    rate = pick("rate")
    burst = pick("burst")
    if burst is None:
        burst = max(1, int(rate)) if rate is not None else 1
    return Quota(None if rate is None else float(rate), burst, pick("rows_in_flight"))
