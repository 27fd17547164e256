"""The dashboard as a plain ASGI application, so any ASGI server or framework can mount it:
``GET /`` is the page, ``GET /dashboard/events`` the live feed (server-sent events, a frame a
second, for as long as the browser listens).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from nats.aio.client import Client as NatsClient

from inferbus.dashboard.feed import frames
from inferbus.dashboard.page import EVENTS_PATH, PAGE
from inferbus.pipeline.lifecycle import cancel_and_wait

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Dashboard:
    """``Dashboard(nats)``: the ASGI app over one NATS connection (the gateway's). While a page
    is open it follows the cluster; the page arrives with the latest frame in it, so it shows
    the cluster at once (and to tools that read the page without running its feed)."""

    def __init__(self, nats: NatsClient, interval: float = 1.0) -> None:
        self.nats = nats
        self.interval = interval
        self.latest: dict[str, Any] = {}
        self._seen = asyncio.Event()  # the first frame is there
        self._following: asyncio.Task[None] | None = None

    async def _follow(self) -> None:
        async for frame in frames(self.nats, self.interval):
            self.latest = frame
            self._seen.set()

    async def close(self) -> None:
        if self._following is not None:
            await cancel_and_wait([self._following])
            self._following = None

    async def _page(self) -> bytes:
        if self._following is None:
            self._following = asyncio.create_task(self._follow())
        await self._seen.wait()  # the first look at the cluster, once
        first = orjson.dumps(self.latest).decode().replace("</", "<\\/")
        return PAGE.replace("const FIRST = null;", f"const FIRST = {first};").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "/")
        if scope.get("method") != "GET" or path not in ("/", EVENTS_PATH):
            await _respond(send, 404, b"text/plain", b"not found")
        elif path == "/":
            await _respond(send, 200, b"text/html; charset=utf-8", await self._page())
        else:
            await self._events(receive, send)

    async def _events(self, receive: Receive, send: Send) -> None:
        """Frames until the browser goes away (the server's ``http.disconnect``)."""
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        streaming = asyncio.create_task(self._stream(send))
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            await cancel_and_wait([streaming])

    async def _stream(self, send: Send) -> None:
        async for frame in frames(self.nats, self.interval):
            body = b"data: " + orjson.dumps(frame) + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})


async def _respond(send: Send, status: int, kind: bytes, body: bytes) -> None:
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
