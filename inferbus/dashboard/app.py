"""The dashboard as a plain ASGI application, so any ASGI server or framework can mount it:
``GET /`` is the page, ``GET /dashboard/events`` the live feed (server-sent events, a frame a
second, for as long as the browser listens or until the dashboard closes).

One follower looks at the cluster for every viewer of a ``Dashboard``: the page and each event
stream take its newest frame (latest.py), so a hundred open tabs cost the workers what one does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, Final

import orjson
from nats.aio.client import Client as NatsClient

from inferbus.dashboard.feed import Frame, frames
from inferbus.dashboard.latest import Latest
from inferbus.dashboard.page import EVENTS_PATH, page
from inferbus.pipeline.lifecycle import cancel_and_wait

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_STREAMS: Final = 64  # open event streams per dashboard; more are refused (503)
FIRST_FRAME_S: Final = 3.0  # how long the page waits for a first frame before it goes without


class Dashboard:
    """``Dashboard(nats)``: the ASGI app over one NATS connection (the gateway's). It starts
    following the cluster when first asked, and stops at ``close``; the page arrives with the
    newest frame in it, so it shows the cluster at once (and to tools that read the page
    without running its feed)."""

    def __init__(self, nats: NatsClient, interval: float = 1.0) -> None:
        self.nats = nats
        self.interval = interval
        self.max_streams = MAX_STREAMS
        self.first_frame_s = FIRST_FRAME_S
        self.streams = 0  # event streams open now
        self._latest: Latest[Frame] = Latest()
        self._following: asyncio.Task[None] | None = None

    def end_streams(self) -> None:
        """End every open event stream now, and refuse new ones. Not async, so a server can
        call it as it begins to shut down, before it waits for open responses to finish."""
        self._latest.close()

    async def close(self) -> None:
        """End the streams and stop following the cluster; the dashboard serves no more frames."""
        self.end_streams()
        if self._following is not None:
            await cancel_and_wait([self._following])

    def _follow(self) -> None:
        """Start the follower on first use (an unused dashboard costs nothing), not after close."""
        if self._following is None and not self._latest.closed:
            self._following = asyncio.create_task(self._following_frames(), name="dashboard")

    async def _following_frames(self) -> None:
        async with contextlib.aclosing(frames(self.nats, self.interval)) as following:
            async for frame in following:
                self._latest.publish(frame)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "/")
        if scope.get("method") != "GET" or path not in ("/", EVENTS_PATH):
            await _respond(send, 404, b"not found")
        elif path == "/":
            await _respond(send, 200, await self._page(), kind=b"text/html; charset=utf-8")
        elif self._latest.closed:
            await _respond(send, 503, b"the dashboard is closed")
        elif self.streams >= self.max_streams:
            await _respond(send, 503, b"too many dashboard streams open; try again later")
        else:
            self.streams += 1
            try:
                await self._events(receive, send)
            finally:
                self.streams -= 1

    async def _page(self) -> bytes:
        """The page with the newest frame, or with none when none comes in time."""
        self._follow()
        newest = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.first_frame_s):
                newest = await self._latest.newer_than(0)
        return page(None if newest is None else newest[1])

    async def _events(self, receive: Receive, send: Send) -> None:
        """Frames until the browser goes away (the server's ``http.disconnect``) or the
        dashboard closes."""
        self._follow()
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await _first_to_end(self._stream(send), _disconnect(receive))

    async def _stream(self, send: Send) -> None:
        """Each frame newer than the last one sent: a slow reader skips frames, never queues
        them. The response ends when the dashboard closes."""
        sent = 0
        while (newer := await self._latest.newer_than(sent)) is not None:
            sent, frame = newer
            body = b"data: " + orjson.dumps(frame) + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_to_end(*work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until any of it ends; the rest is cancelled, and an error raised."""
    tasks = [asyncio.create_task(each) for each in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)
    for task in done:
        task.result()


async def _respond(send: Send, status: int, body: bytes, *, kind: bytes = b"text/plain") -> None:
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
