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
    deploy = ["lab-*"]               # model names to deploy beyond her own "alice-*"
    deploy_code = false              # may her model folders ship Python (engine_class)?
    stored_mb = 1024                 # archives her deployments keep in the store
    deployments = 4                  # deployments she may have at once

Every user may deploy, and call, models named ``<user>-<anything>``; ``deploy``, the last
three limits and ``deploy_code`` may also be set on groups (the most generous value wins).

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
_QUOTA_KEYS: Final = frozenset({"rate", "burst", "rows_in_flight", "stored_mb", "deployments"})
_OTHER_KEYS: Final = frozenset({"models", "deploy", "deploy_code"})
#: what a user may keep in the model store unless the roster says otherwise
DEFAULT_STORED_MB: Final = 1024
DEFAULT_DEPLOYMENTS: Final = 4


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
class DeployRights:
    """What a user may put in the model store."""

    patterns: tuple[str, ...] = ()  # model names beyond the user's own prefix
    code: bool = False  # folders with Python files (engine_class)
    stored_mb: int = DEFAULT_STORED_MB
    deployments: int = DEFAULT_DEPLOYMENTS


@dataclass(frozen=True, slots=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # grants: names or fnmatch patterns
    quota: Quota = UNLIMITED
    deploy: DeployRights = DeployRights()

    @property
    def prefix(self) -> str:
        """The model names a user owns: ``<user>-...``."""
        return f"{self.name}-"

    def may_use(self, model: str) -> bool:
        if model.startswith(self.prefix):
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def may_deploy(self, model: str) -> bool:
        if model.startswith(self.prefix) and len(model) > len(self.prefix):
            return True
        return any(fnmatch.fnmatchcase(model, p) for p in self.deploy.patterns)


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
    deploy: tuple[str, ...] = ()


def _models(where: str, value: Any, key: str = "models") -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key} is a list of model names or patterns")
    return tuple(value)


def _limits(where: str, table: Mapping[str, Any]) -> dict[str, Any]:
    limits = {key: table[key] for key in _QUOTA_KEYS if key in table}
    if "deploy_code" in table:
        if type(table["deploy_code"]) is not bool:
            raise ConfigError(f"{where}: deploy_code is true or false")
        limits["deploy_code"] = table["deploy_code"]
    rate = limits.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                             or rate <= 0):  # fmt: skip
        raise ConfigError(f"{where}: rate is a number of requests per second > 0")
    for key in ("burst", "rows_in_flight", "stored_mb", "deployments"):
        value = limits.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ConfigError(f"{where}: {key} is an integer >= 1")
    return limits


def _group(name: str, table: Mapping[str, Any]) -> _Group:
    where = f"[groups.{name}]"
    unknown = sorted(set(table) - _QUOTA_KEYS - _OTHER_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    deploy = _models(where, table.get("deploy", []), "deploy")
    return _Group(_models(where, table.get("models", [])), _limits(where, table), deploy)


def _user(name: str, table: Mapping[str, Any], groups: Mapping[str, _Group]) -> User:
    where = f"[users.{name}]"
    unknown = sorted(set(table) - _QUOTA_KEYS - _OTHER_KEYS - {"groups"})
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
    group_limits = [groups[g].limits for g in member_of]
    deploy = list(_models(where, table.get("deploy", []), "deploy"))
    for group in member_of:
        deploy += [p for p in groups[group].deploy if p not in deploy]
    return User(name, tuple(member_of), tuple(models), _quota(own, group_limits),
                _deploy_rights(tuple(deploy), own, group_limits))  # fmt: skip


def _pick(key: str, own: Mapping[str, Any], group_limits: list[Mapping[str, Any]]) -> Any:
    """The user's own value for a limit, else the most generous of their groups', else None."""
    if key in own:
        return own[key]
    values = [limits[key] for limits in group_limits if key in limits]
    return max(values) if values else None


def _deploy_rights(patterns: tuple[str, ...], own: Mapping[str, Any],
                   group_limits: list[Mapping[str, Any]]) -> DeployRights:  # fmt: skip
    stored = _pick("stored_mb", own, group_limits)
    count = _pick("deployments", own, group_limits)
    return DeployRights(
        patterns,
        bool(_pick("deploy_code", own, group_limits)),
        DEFAULT_STORED_MB if stored is None else stored,
        DEFAULT_DEPLOYMENTS if count is None else count,
    )


def _quota(own: Mapping[str, Any], group_limits: list[Mapping[str, Any]]) -> Quota:
    """The user's own value for each limit, else the most generous of their groups'."""

    def pick(key: str) -> Any:
        return _pick(key, own, group_limits)

    rate = pick("rate")
    burst = pick("burst")
    if burst is None:
        burst = max(1, int(rate)) if rate is not None else 1
    return Quota(None if rate is None else float(rate), burst, pick("rows_in_flight"))
