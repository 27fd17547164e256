"""``inferbus gateway``: one bus connection, the V2 routes on uvicorn, until SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Final

import uvicorn

from inferbus.dashboard.app import Dashboard
from inferbus.gateway.app import Gateway, GatewaySettings
from inferbus.gateway.identities import Identities, OneIdentity, PerUser

__all__ = ["GatewayServer", "GatewaySettings", "listening_socket", "run_gateway"]
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.transport import Transport
from inferbus.tenancy.live import signal_handlers

#: how long a stop waits for open responses (a per-user dashboard's event stream, a slow
#: inference) before uvicorn cancels them: SIGTERM always ends the process
GRACEFUL_SHUTDOWN_S: Final = 5


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
    shutdown, which would end the process before the bus connection drains. ``stopping`` runs
    as shutdown begins, to end responses that would otherwise never finish (event streams)."""

    def __init__(self, config: uvicorn.Config, *, stopping: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.stopping = stopping

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        with signal_handlers({signal.SIGTERM: self.stop, signal.SIGINT: self.stop}):
            yield

    def stop(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # however the stop was asked for: uvicorn then waits for open responses to finish
        if self.stopping is not None:
            self.stopping()
        await super().shutdown(sockets)


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
        dashboard: Dashboard | None = None  # per-user mode: each session has its own
        if self.per_user:  # no identity of its own, so no connection of its own either
            identities = PerUser(self.options)
        else:
            transport = await Transport.open(self.options)
            identities, dashboard = OneIdentity(transport), Dashboard(transport.nats)
        try:
            app = Gateway(identities, self.settings, dashboard=dashboard).app()
            config = uvicorn.Config(app, lifespan="off", log_level="warning",
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)  # fmt: skip

            def stopping() -> None:  # open event streams end now, not when uvicorn gives up
                if dashboard is not None:
                    dashboard.end_streams()
                identities.end_streams()

            await _Server(config, stopping=stopping).serve(sockets=[self.sock])
        finally:
            if dashboard is not None:
                await dashboard.close()
            await identities.close()


async def run_gateway(
    options: ConnectOptions, host: str, port: int, settings: GatewaySettings, per_user: bool
) -> int:
    """``inferbus gateway``: the address is printed once the socket listens (requests wait in
    its backlog until the server serves), then it serves until SIGTERM/SIGINT."""
    sock = listening_socket(host, port)
    print(f"gateway listening on http://{host}:{port} (KServe V2)", flush=True)
    await GatewayServer(options, sock, settings, per_user=per_user).serve()
    return 0
