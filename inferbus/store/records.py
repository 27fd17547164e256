"""What the model store holds: desired deployments (a JetStream KV bucket) and model archives
(a JetStream Object Store bucket, one object per archive, named by its sha256).

A ``Deployment`` is one model version that should be served: which archive holds its folder,
how many workers should hold it, where it may run and how much memory it needs. ``inferbus
deploy`` writes them; workers started with ``--store`` watch them and reconcile.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson

from inferbus.contract import NAME_PATTERN
from inferbus.errors import ConfigError

#: the JetStream Object Store bucket of model archives (object name: the archive's sha256)
FILES_BUCKET: Final = "inferbus-models"
#: the JetStream KV bucket of desired deployments (key: ``<model>.<version>``)
DEPLOYMENTS_BUCKET: Final = "inferbus-deployments"
#: the JetStream KV bucket of replica claims (key: ``<model>.<version>.<slot>``; entries expire)
CLAIMS_BUCKET: Final = "inferbus-claims"
#: the subject a client asks on when a deployed model has no worker yet (load on demand)
DEMAND_SUBJECT: Final = "inferbus.store.demand"
DEVICES: Final = frozenset({"cpu", "cuda"})
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model version the store should have served."""

    model: str
    version: int
    sha256: str  # of the archive (see archive.py)
    size: int  # the archive's bytes
    replicas: int | None = None  # None: any worker with room may hold it ("any")
    device: str | None = None  # a constraint: only workers with this device load it
    memory_mb: int = 0  # an estimate; workers with a memory budget count it
    owner: str = ""  # who deployed it (their account on a shared bus; "" on an open one)
    has_code: bool = False  # the folder holds an engine_class .py file: code, not data
    deployed_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.model):
            raise ConfigError(f"model name {self.model!r} must match [A-Za-z0-9_-]+")
        if type(self.version) is not int or self.version < 1:
            raise ConfigError("a deployment's version is an integer >= 1")
        if not _SHA256.fullmatch(self.sha256):
            raise ConfigError("a deployment's sha256 is 64 lowercase hex digits")
        if type(self.size) is not int or self.size < 1:
            raise ConfigError("a deployment's archive size is an integer >= 1")
        if self.replicas is not None and (type(self.replicas) is not int or self.replicas < 1):
            raise ConfigError('replicas is an integer >= 1, or "any"')
        if self.device is not None and self.device not in DEVICES:
            raise ConfigError(f"device must be one of {sorted(DEVICES)}")
        if type(self.memory_mb) is not int or self.memory_mb < 0:
            raise ConfigError("memory_mb is an integer >= 0")

    @property
    def key(self) -> str:
        return deployment_key(self.model, self.version)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> Deployment:
        """A record as stored; ConfigError for anything malformed (the KV is shared state)."""
        try:
            raw: Any = orjson.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            return cls(**raw)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"malformed deployment record: {exc}") from None


def deployment_key(model: str, version: int) -> str:
    return f"{model}.{version}"
