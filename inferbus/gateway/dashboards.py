"""The dashboard behind the gateway's identities: with ``--per-user`` each caller signs in
(HTTP basic, as for inference) and sees the cluster as their own NATS identity does — the
models granted to them and their own usage row, since workers answer each identity for
itself. Never the gateway's view for anyone who asks."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from inferbus.dashboard.app import Dashboard
from inferbus.errors import ConnectionFailed
from inferbus.gateway.identities import PerUser, Unauthenticated
from inferbus.gateway.replies import refusal_response


class OwnDashboards:
    """An ASGI app: the caller's own ``Dashboard``, made on their session's connection the
    first time they open it, closed with that session."""

    def __init__(self, identities: PerUser) -> None:
        self.identities = identities

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = Headers(scope=scope).get("authorization")
        try:
            async with self.identities.using(authorization) as session:
                if session.dashboard is None:
                    session.dashboard = Dashboard(session.transport.nats)
                await session.dashboard(scope, receive, send)
        except (Unauthenticated, ConnectionFailed) as error:  # 401: the browser asks who
            await refusal_response(error)(scope, receive, send)
