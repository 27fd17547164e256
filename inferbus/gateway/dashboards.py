"""The dashboard behind the gateway's identities: with ``--per-user`` each caller signs in
(HTTP basic, as for inference) and sees the cluster as their own NATS identity does — the
models granted to them and their own usage row, since workers answer each identity for
itself. Never the gateway's view for anyone who asks."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from inferbus.dashboard.app import Dashboard
from inferbus.errors import ConnectionFailed
from inferbus.gateway.identities import PerUser, Unauthenticated


class OwnDashboards:
    """An ASGI app: the caller's own ``Dashboard``, made on their session's connection the
    first time they open it, closed with that session."""

    def __init__(self, identities: PerUser) -> None:
        self.identities = identities

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = _header(scope, b"authorization")
        try:
            async with self.identities.using(authorization) as session:
                if session.dashboard is None:
                    session.dashboard = Dashboard(session.transport.nats)
                await session.dashboard(scope, receive, send)
        except Unauthenticated as error:  # the browser asks for the user's credentials
            headers = {"WWW-Authenticate": 'Basic realm="inferbus"'}
            await JSONResponse({"error": str(error)}, 401, headers=headers)(scope, receive, send)
        except ConnectionFailed as error:
            await JSONResponse({"error": str(error)}, 503)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
