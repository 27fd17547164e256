"""``inferbus gateway``: one bus connection, the V2 routes on uvicorn, until SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn

from inferbus.dashboard.app import Dashboard
from inferbus.gateway.app import Gateway, GatewaySettings
from inferbus.gateway.identities import Identities, OneIdentity, PerUser

__all__ = ["GatewayServer", "GatewaySettings", "listening_socket", "run_gateway"]
from inferbus.errors import ConnectionFailed
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.transport import Transport
from inferbus.tenancy.live import signal_handlers

log = logging.getLogger("inferbus.gateway")


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket: connections wait in its backlog until uvicorn serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, but a signal only stops it: uvicorn re-raises SIGTERM after its graceful
    shutdown, which would end the process before the bus connection drains."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        with signal_handlers({signal.SIGTERM: self.stop, signal.SIGINT: self.stop}):
            yield

    def stop(self) -> None:
        self.should_exit = True


class GatewayServer:
    """The gateway on ``sock``, until SIGTERM/SIGINT: bus connections are opened first (the
    gateway's own) or per caller (``per_user``), and drained last."""

    def __init__(
        self,
        options: ConnectOptions,
        sock: socket.socket,
        settings: GatewaySettings | None = None,
        *,
        per_user: bool = False,
    ) -> None:
        self.options = options
        self.sock = sock
        self.settings = settings
        self.per_user = per_user

    async def serve(self) -> None:
        identities: Identities
        watching: Transport | None = None  # the dashboard's own connection, per-user mode
        if self.per_user:
            identities = PerUser(self.options)
            watching = await _watching(self.options)
            nats = None if watching is None else watching.nats
        else:
            transport = await Transport.open(self.options)
            identities, nats = OneIdentity(transport), transport.nats
        dashboard = None if nats is None else Dashboard(nats)
        try:
            app = Gateway(identities, self.settings, dashboard=dashboard).app()
            config = uvicorn.Config(app, lifespan="off", log_level="warning")
            await _Server(config).serve(sockets=[self.sock])
        finally:
            if dashboard is not None:
                await dashboard.close()
            if watching is not None:
                await watching.close()
            await identities.close()


async def _watching(options: ConnectOptions) -> Transport | None:
    """With --per-user, the dashboard watches the cluster as the gateway's own identity (the
    connection flags; an admin shows every user's usage); without one that may connect, the
    gateway serves no dashboard."""
    try:
        return await Transport.open(options)
    except ConnectionFailed as exc:
        log.warning("no dashboard: the gateway's own identity cannot connect (%s)", exc)
        return None


async def run_gateway(
    options: ConnectOptions, host: str, port: int, settings: GatewaySettings, per_user: bool
) -> int:
    """``inferbus gateway``: the address is printed once the socket listens (requests wait in
    its backlog until the server serves), then it serves until SIGTERM/SIGINT."""
    sock = listening_socket(host, port)
    print(f"gateway listening on http://{host}:{port} (KServe V2)", flush=True)
    await GatewayServer(options, sock, settings, per_user=per_user).serve()
    return 0
