"""A nats-server run from a roster, and kept in step with it.

When the roster file changes (``poll``, once a second) or on SIGHUP (``reload``), the roster is
applied again and the server reloads its configuration: connected workers and users stay
connected, new identities can connect, removed ones are cut off. A roster that no longer
checks out is reported and the running configuration kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

from inferbus.errors import ConfigError, ServerError
from inferbus.natsserver import Cluster, EmbeddedServer
from inferbus.tenancy.state import AppliedRoster, apply_roster

log = logging.getLogger("inferbus.roster")
POLL_INTERVAL_S = 1.0

_Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> _Stamp:
    """What changes when a file is written or replaced (editors often replace)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


class RosterServer:
    """``with RosterServer(roster, state) as running:`` applies the roster to ``state`` and
    runs nats-server with it. ``flags`` override the roster's ``[server]`` table (None: not
    given); a broken roster at start raises ``ConfigError``."""

    def __init__(
        self,
        roster: Path,
        state: Path,
        *,
        monitor_port: int | None = None,
        cluster: Cluster | None = None,
        **flags: object,
    ) -> None:
        self.roster = roster
        self.state = state
        self._flags = flags
        self._stamp = _stamp(roster)
        self.applied: AppliedRoster = apply_roster(roster, state, **flags)
        self.server: EmbeddedServer = self.applied.settings.server(
            self.applied.accounts, cluster=cluster, monitor_port=monitor_port
        )

    def __enter__(self) -> RosterServer:
        self.server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.stop()

    def poll(self) -> bool:
        """Apply the roster again if its file changed since the last look; True if it was."""
        stamp = _stamp(self.roster)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return self.reload()

    def reload(self) -> bool:
        """Apply the roster and reload the server; False (logged) if either refused it. (If
        the server refuses a config that the roster checks passed, the state folder already
        holds the new files while the server runs the old ones: the log says why.)"""
        try:
            applied = apply_roster(self.roster, self.state, **self._flags)
            self.server.reload(accounts=applied.accounts, tls=applied.settings.tls)
            if set(applied.roster.users) - set(self.applied.roster.users):
                # nats-server 2.15 links an account's imports to the live exporting account
                # only if the account existed before the reload: a new user's requests would
                # find "no responders" until a second reload (tests/test_roster_server.py).
                self.server.reload()
        except (ConfigError, ServerError) as exc:
            log.error("roster not applied; the server keeps the previous one: %s", exc)
            return False
        self._warn_if_restart_needed(applied)
        self.applied = applied
        log.info("roster %s applied, server reloaded%s", self.roster, _changes(applied))
        return True

    def _warn_if_restart_needed(self, applied: AppliedRoster) -> None:
        settings = applied.settings
        running = (self.server.host, self.server.port, self.server.max_payload)
        if (settings.host, settings.port, settings.max_payload) != running:
            log.warning("[server] host, port and max_payload take effect at the next start")


def _changes(applied: AppliedRoster) -> str:
    added, removed = applied.credentials.added, applied.credentials.removed
    parts = [f"{verb} {', '.join(map(str, who))}"
             for verb, who in (("added", added), ("removed", removed)) if who]  # fmt: skip
    return f": {'; '.join(parts)}" if parts else ": no one added or removed"


async def follow(
    running: RosterServer, hangup: asyncio.Event, *, interval: float = POLL_INTERVAL_S
) -> None:
    """Keep ``running`` in step with its roster until cancelled: ``poll`` every ``interval``
    seconds, ``reload`` when ``hangup`` is set (SIGHUP). Both wait for the server, so they run
    off the event loop."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hangup.wait(), interval)
        if hangup.is_set():
            hangup.clear()
            await asyncio.to_thread(running.reload)
        else:
            await asyncio.to_thread(running.poll)


async def serve(running: RosterServer | None, on_ready: Callable[[], None]) -> None:
    """Until SIGINT or SIGTERM, follow ``running``'s roster (None: an open server, nothing to
    follow; SIGHUP is ignored rather than left to kill us); ``on_ready`` once the signals are
    ours."""
    stop, hangup = asyncio.Event(), asyncio.Event()
    with signal_handlers({signal.SIGINT: stop.set, signal.SIGTERM: stop.set,
                          signal.SIGHUP: hangup.set}):  # fmt: skip
        on_ready()
        async with asyncio.TaskGroup() as group:
            following = group.create_task(follow(running, hangup)) if running else None
            await stop.wait()
            if following is not None:
                following.cancel()


@contextlib.contextmanager
def signal_handlers(handlers: Mapping[signal.Signals, Callable[[], object]]) -> Iterator[None]:
    """Run each handler on the event loop when its signal arrives, while the block lasts."""
    loop = asyncio.get_running_loop()
    for number, handler in handlers.items():
        loop.add_signal_handler(number, handler)
    try:
        yield
    finally:
        for number in handlers:
            loop.remove_signal_handler(number)
