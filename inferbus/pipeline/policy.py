"""Tenancy, the shared-bus part of a worker: who a request is from, whether they may call the
model, and whether their quota lets it in now; and what each user has used.

Only a worker started with a roster has one. Identity is the account nats-server writes into
``Nats-Request-Info`` when a request crosses a user's service import (a sender cannot forge
it); never anything in the request body. A request without the header came from inside the
workers' own account (an admin) and is not limited. Quotas hold per worker process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from inferbus.contract import requester_account
from inferbus.errors import ConfigError, Forbidden, Overloaded
from inferbus.roster import Quota, Roster, load_roster

#: the identity of requests from inside the workers' account (admins): all models, no quota
ADMIN: Final = ""
#: Prometheus label for users beyond the roster's (keeps the label set bounded)
OTHER: Final = "(other)"
#: when a user's rows in flight are full, try again after about this long
ROWS_RETRY_S: Final = 0.05

log = logging.getLogger("inferbus.worker")


@dataclass(slots=True)
class _Bucket:
    """A token bucket: ``tokens`` refill at ``rate`` per second up to ``burst``."""

    tokens: float
    updated: float

    def take(self, quota: Quota, now: float) -> float:
        """Take one token; 0.0 if taken, else the seconds until one is there."""
        assert quota.rate is not None
        self.tokens = min(quota.burst, self.tokens + (now - self.updated) * quota.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / quota.rate


class Tenancy:
    """One worker's roster (re-read when its file changes) and per-user quota state."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.roster: Roster = load_roster(self.path)
        self._mtime = self._modified()
        self._buckets: dict[str, _Bucket] = {}
        self._rows: dict[str, int] = {}

    def _modified(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return 0

    def reload_if_changed(self) -> bool:
        """Re-read the roster if its file changed; a broken edit is logged and the old one
        kept (a typo must not lock a class out)."""
        mtime = self._modified()
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.roster = load_roster(self.path)
        except ConfigError as exc:
            log.error("roster not reloaded, keeping the previous one: %s", exc)
            return False
        log.info("roster reloaded: %d users", len(self.roster.users))
        return True

    @staticmethod
    def identify(headers: Mapping[str, str] | None) -> str:
        return requester_account(headers) or ADMIN

    def may_see(self, viewer: str, model: str) -> bool:
        """Discovery shows a user the models granted to them (admins: all)."""
        return viewer == ADMIN or self.roster.allows(viewer, model)

    def admit(self, user: str, model: str) -> None:
        """On arrival, before decoding: Forbidden unless granted; Overloaded (with when to
        retry) when the user is over their request rate."""
        if user == ADMIN:
            return
        if not self.roster.allows(user, model):
            raise Forbidden(f"model {model!r} is not granted to {user!r}")
        quota = self.roster.quota(user)
        if quota.rate is None:
            return
        now = time.monotonic()
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = _Bucket(float(quota.burst), now)
        wait = bucket.take(quota, now)
        if wait:
            raise Overloaded(
                f"{user!r} is over their rate of {quota.rate:g} requests/s", retry_after_s=wait
            )

    def take_rows(self, user: str, rows: int) -> None:
        """Once the request's size is known: Overloaded when it would take the user past
        their rows in flight (queued or running) at this worker."""
        if user == ADMIN:
            return
        limit = self.roster.quota(user).rows_in_flight
        held = self._rows.get(user, 0)
        if limit is not None and held + rows > limit:
            raise Overloaded(
                f"{user!r} has {held} rows in flight here; their limit is {limit}",
                retry_after_s=ROWS_RETRY_S,
            )
        self._rows[user] = held + rows

    def release_rows(self, user: str, rows: int) -> None:
        if user == ADMIN:
            return
        left = self._rows.get(user, 0) - rows
        if left > 0:
            self._rows[user] = left
        else:
            self._rows.pop(user, None)

    def label(self, user: str) -> str:
        """A bounded metric label: roster users by name, anyone else as one."""
        if user == ADMIN:
            return "(admin)"
        return user if user in self.roster.users else OTHER


@dataclass(slots=True)
class _Usage:
    requests: int = 0
    rows: int = 0
    compute_ns: int = 0
    refused: int = 0


class UserUsage:
    """What each user used of one model version: answered requests, rows computed, their
    share of compute time (a batch's time split by rows), and requests refused by policy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # compute time is added on engine threads
        self._by_user: dict[str, _Usage] = {}

    def _of(self, user: str) -> _Usage:
        usage = self._by_user.get(user)
        if usage is None:
            usage = self._by_user[user] = _Usage()
        return usage

    def answered(self, user: str, rows: int) -> None:
        with self._lock:
            usage = self._of(user)
            usage.requests += 1
            usage.rows += rows

    def refused(self, user: str) -> None:
        with self._lock:
            self._of(user).refused += 1

    def computed(self, users_and_rows: list[tuple[str, int]], compute_ns: int) -> None:
        total = sum(rows for _, rows in users_and_rows) or 1
        with self._lock:
            for user, rows in users_and_rows:
                self._of(user).compute_ns += compute_ns * rows // total

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                user or "(admin)": {
                    "requests": usage.requests,
                    "rows": usage.rows,
                    "compute_s": usage.compute_ns / 1e9,
                    "refused": usage.refused,
                }
                for user, usage in sorted(self._by_user.items())
            }
