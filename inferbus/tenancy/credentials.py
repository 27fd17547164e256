"""The seed store: one secret key (an nkey seed) per roster identity, in a private folder.

::

    STATE/admins/<name>.nk    STATE/workers/<name>.nk    STATE/users/<name>.nk

Folders 0700, files 0600. Seeds are stable: ``apply`` keeps the seed of every identity still
in the roster, makes one for each new identity, and deletes the files of identities the roster
no longer names (their connection files too). An identity that changes kind — a user made an
admin — gets a new key, so a file handed out for the old role opens nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from inferbus.errors import ConfigError
from inferbus.roster import Roster
from inferbus.tenancy._files import private_folder, write_private
from inferbus.tenancy.keys import new_user_seed, public_key

Kind = Literal["admin", "worker", "user"]
KINDS: Final[tuple[Kind, ...]] = ("admin", "worker", "user")
SEED_SUFFIX: Final = ".nk"
CONNECTION_SUFFIX: Final = ".toml"


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    """Someone the server knows by a key: an admin, a worker or a user of the roster."""

    kind: Kind
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"

    def path(self, state: Path, suffix: str) -> Path:
        return state / f"{self.kind}s" / f"{self.name}{suffix}"


def identities(roster: Roster) -> list[Identity]:
    return [
        *(Identity("admin", name) for name in roster.admins),
        *(Identity("worker", name) for name in roster.workers),
        *(Identity("user", name) for name in roster.users),
    ]


@dataclass(frozen=True, slots=True)
class Credentials:
    """The public key of each identity, and what the last ``apply`` changed."""

    state: Path
    public_keys: Mapping[Identity, str]
    added: tuple[Identity, ...] = ()
    removed: tuple[Identity, ...] = ()

    def seed_path(self, identity: Identity) -> Path:
        return identity.path(self.state, SEED_SUFFIX)

    def seed(self, identity: Identity) -> str:
        if identity not in self.public_keys:
            raise ConfigError(f"the roster names no {identity}")
        return self.seed_path(identity).read_text(encoding="ascii").strip()


def apply(roster: Roster, state: Path) -> Credentials:
    """Bring the seeds in ``state`` in line with ``roster``; the public keys."""
    private_folder(state)
    wanted = identities(roster)
    removed = _remove_others(state, set(wanted))
    added: list[Identity] = []
    keys: dict[Identity, str] = {}
    for identity in wanted:
        path = identity.path(state, SEED_SUFFIX)
        if not path.exists():
            private_folder(path.parent)
            write_private(path, new_user_seed() + "\n")
            added.append(identity)
        keys[identity] = _public_key(path)
    return Credentials(state, keys, tuple(added), tuple(removed))


def _public_key(path: Path) -> str:
    try:
        return public_key(path.read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}; delete it to give this identity a new key") from None


def _remove_others(state: Path, wanted: set[Identity]) -> list[Identity]:
    """Delete the seed and connection files of identities not in ``wanted``; who they were."""
    removed: set[Identity] = set()
    for kind in KINDS:
        folder = state / f"{kind}s"
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.suffix not in (SEED_SUFFIX, CONNECTION_SUFFIX) or not path.is_file():
                continue  # not ours: leave it
            identity = Identity(kind, path.stem)
            if identity not in wanted:
                path.unlink()
                removed.add(identity)
    return sorted(removed)
