"""The dashboard's feed under load and abuse, on a real nats-server: one follower for every
viewer, replies of the wrong shape left out, the first frame embedded safely, and streams that
end when the dashboard closes or the gateway is stopped.

A fake worker is a plain nats-py connection answering ``$SRV.INFO`` / ``$SRV.STATS`` with
whatever bytes a test gives. Event streams are driven as an ASGI server drives them (httpx's
ASGITransport would buffer a response that never ends)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import inferbus
from inferbus.contract import service_subject
from inferbus.dashboard.app import FIRST_FRAME_S, MAX_STREAMS, Dashboard
from inferbus.dashboard.page import EVENTS_PATH, PAGE, script_json
from inferbus.gateway.serve import GRACEFUL_SHUTDOWN_S
from inferbus.natsserver import free_port

FRAMES = 3  # frames each stream waits for where a test needs the feed to be running
WAIT_S = 15.0  # the most any awaited condition here may take

GOOD_INFO: dict[str, Any] = {
    "id": "w1",
    "metadata": {"host": "gpu1", "pid": "7"},
    "endpoints": [{"metadata": {"model": "add", "version": "1", "engine": "onnxruntime",
                                "device": "cpu"}}],
}  # fmt: skip
GOOD_STATS: dict[str, Any] = {"id": "w1", "endpoints": [{
    "subject": "inferbus.infer.add.1",
    "data": {"request_count": 10, "pending": 2, "compute_ms": {"p50": 0.5, "p99": 2.0},
             "users": {"alice": {"requests": 9, "rows": 9, "compute_s": 0.003, "refused": 0}}},
}]}  # fmt: skip


class FakeWorker:
    """Answers each ``$SRV.INFO`` and ``$SRV.STATS`` request with every reply it is given (one
    request, many replies: as many workers would), counting the STATS requests."""

    def __init__(self, infos: list[bytes], stats: list[bytes]) -> None:
        self.infos = infos
        self.stats = stats
        self.stats_asked = 0

    async def answer_on(self, connection: NatsClient) -> None:
        async def info(msg: Msg) -> None:
            for reply in self.infos:
                await connection.publish(msg.reply, reply)

        async def stats(msg: Msg) -> None:
            self.stats_asked += 1
            for reply in self.stats:
                await connection.publish(msg.reply, reply)

        await connection.subscribe(service_subject("INFO"), cb=info)
        await connection.subscribe(service_subject("STATS"), cb=stats)
        await connection.flush()


def good_worker() -> FakeWorker:
    return FakeWorker([orjson.dumps(GOOD_INFO)], [orjson.dumps(GOOD_STATS)])


class EventStream:
    """One ``GET /dashboard/events``, called as an ASGI server calls it: the status, the
    frames as they come, whether the response ended; ``leave`` is the browser going away."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.status: int | None = None
        self.body = b""
        self.frames: list[dict[str, Any]] = []
        self.ended = False
        self._changed = asyncio.Condition()
        self._gone = asyncio.Event()
        scope = {"type": "http", "method": "GET", "path": EVENTS_PATH, "headers": []}
        self.call = asyncio.create_task(dashboard(scope, self._receive, self._send))

    async def _receive(self) -> MutableMapping[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            body: bytes = message.get("body", b"")
            self.body += body
            if body.startswith(b"data: "):
                self.frames.append(orjson.loads(body.removeprefix(b"data: ")))
            self.ended = not message.get("more_body", False)
        async with self._changed:
            self._changed.notify_all()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(condition)

    async def until_frames(self, count: int) -> None:
        await self.until(lambda: len(self.frames) >= count)

    async def leave(self) -> None:
        self._gone.set()
        async with asyncio.timeout(WAIT_S):
            await self.call


@pytest.fixture
async def dashboard_nats(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[NatsClient]:
    """The dashboard's own connection (the fake workers answer on ``raw_nats``)."""
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.close()


@pytest.fixture
async def dashboard(dashboard_nats: NatsClient) -> AsyncIterator[Dashboard]:
    board = Dashboard(dashboard_nats, interval=0.1)
    yield board
    await board.close()


async def get_page(dashboard: Dashboard) -> str:
    transport = httpx.ASGITransport(app=dashboard)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
        response = await client.get("/", timeout=WAIT_S)
    assert response.status_code == 200
    return response.text


def embedded_frame(html: str) -> Any:
    match = re.search(r"const FIRST = (.*);\n", html)
    assert match, "no first frame in the page"
    return orjson.loads(match.group(1))


# --- one follower for every viewer -------------------------------------------------------------


async def test_event_streams_share_one_follower(
    dashboard_nats: NatsClient, raw_nats: NatsClient
) -> None:
    """The workers are asked once a frame however many streams are open (each stream its own
    loop asked 8 times as often)."""
    worker = good_worker()
    await worker.answer_on(raw_nats)

    async def stats_requests(viewers: int) -> int:
        before = worker.stats_asked
        board = Dashboard(dashboard_nats, interval=0.1)
        streams = [EventStream(board) for _ in range(viewers)]
        for stream in streams:
            await stream.until_frames(FRAMES)
        asked = worker.stats_asked - before
        for stream in streams:
            await stream.leave()
        await board.close()
        return asked

    # many first: a request of its follower's still on the way counts against the one alone
    shared = await stats_requests(8)
    alone = await stats_requests(1)
    assert FRAMES <= shared <= FRAMES + 1, f"8 streams: {shared} requests for {FRAMES} frames"
    assert shared <= alone + 1, f"8 streams asked {shared} times, 1 stream {alone}"


async def test_streams_past_the_cap_are_refused(dashboard: Dashboard) -> None:
    streams = [EventStream(dashboard) for _ in range(MAX_STREAMS)]
    await streams[-1].until(lambda: all(s.status == 200 for s in streams))
    refused = EventStream(dashboard)
    await refused.until(lambda: refused.ended)
    assert refused.status == 503
    assert b"too many" in refused.body
    await streams[0].leave()  # one goes away: room for one more
    admitted = EventStream(dashboard)
    await admitted.until(lambda: admitted.status is not None)
    assert admitted.status == 200
    for stream in [*streams[1:], admitted]:
        await stream.leave()
    assert dashboard.streams == 0


# --- replies of the wrong shape ------------------------------------------------------------------


async def test_a_malformed_reply_does_not_stop_the_feed(
    dashboard: Dashboard, raw_nats: NatsClient
) -> None:
    bad_stats = {"id": "w2", "started": 5, "endpoints": [{
        "subject": "inferbus.infer.add.1",
        "data": {"pending": "lots", "request_count": "many", "errors_by_code": [1],
                 "compute_ms": {"p50": "fast", "p99": None}, "queue_ms": "slow",
                 "users": {"eve": {"requests": "lots"}}},
    }]}  # fmt: skip
    bad_infos = [b"not json", b"[1, 2]", b'{"endpoints": 7}', b'{"id": ["w", 3]}',
                 b'{"id": "w2", "metadata": {"host": ["x"]}, "endpoints": ["e", {"metadata": 1}]}',
                 orjson.dumps({**GOOD_INFO, "id": {"not": "text"}})]  # fmt: skip
    worker = FakeWorker(
        [*bad_infos, orjson.dumps(GOOD_INFO)],
        [b'{"endpoints": "abc"}', orjson.dumps(bad_stats), orjson.dumps(GOOD_STATS)],
    )
    await worker.answer_on(raw_nats)
    stream = EventStream(dashboard)
    await stream.until_frames(FRAMES)  # the feed goes on; and a frame shows what did read:
    await stream.until(lambda: len(stream.frames[-1]["workers"]) == 2)
    latest = stream.frames[-1]
    assert [(w["id"], w["host"]) for w in latest["workers"]] == [("w2", "?"), ("w1", "gpu1")]
    (model,) = latest["models"]
    assert (model["workers"], model["requests"], model["pending"]) == (2, 10, 2)
    assert model["compute_p99_ms"] == 2.0
    assert [u["user"] for u in latest["users"]["add v1"]] == ["alice"]  # eve's row unreadable
    await stream.leave()


async def test_the_page_comes_without_a_frame_when_none_arrives(
    nats_server: inferbus.EmbeddedServer,
) -> None:
    """A connection that is gone fails every look; the page waits its bound, then comes
    without a first frame (the feed fills it in, should one ever come)."""
    gone = await nats.connect(nats_server.url)
    await gone.close()
    board = Dashboard(gone, interval=0.1)
    try:
        began = time.monotonic()
        html = await get_page(board)
        waited = time.monotonic() - began
    finally:
        await board.close()
    assert "const FIRST = null;" in html
    assert FIRST_FRAME_S - 0.5 <= waited < FIRST_FRAME_S + 2


# --- the page ------------------------------------------------------------------------------------


async def test_the_embedded_frame_escapes_markup(
    dashboard: Dashboard, raw_nats: NatsClient
) -> None:
    host = "</script><!--<script>alert(1)</script>\u2028\u2029"
    hostile = {**GOOD_INFO, "metadata": {"host": host, "pid": "7"}}
    await FakeWorker([orjson.dumps(hostile)], []).answer_on(raw_nats)
    stream = EventStream(dashboard)  # until the newest frame, which the page embeds, has it
    await stream.until(lambda: bool(stream.frames and stream.frames[-1]["workers"]))
    html = await get_page(dashboard)
    await stream.leave()
    script = html[html.index("const FIRST = ") :]
    assert "<" not in script[: script.index(";\n")]
    assert "\u2028" not in html
    assert "\u2029" not in html
    assert embedded_frame(html)["workers"][0]["host"] == host  # the same text, once parsed


def test_script_json_escapes_what_could_end_a_script() -> None:
    text = script_json({"a": "</script><!--", "b": "\u2028\u2029"})
    assert text == '{"a":"\\u003c/script>\\u003c!--","b":"\\u2028\\u2029"}'
    assert orjson.loads(text) == {"a": "</script><!--", "b": "\u2028\u2029"}


def test_the_page_sets_values_as_text() -> None:
    assert "textContent" in PAGE
    for as_html in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert as_html not in PAGE


# --- closing -------------------------------------------------------------------------------------


async def test_close_ends_open_streams(dashboard: Dashboard, raw_nats: NatsClient) -> None:
    await good_worker().answer_on(raw_nats)
    streams = [EventStream(dashboard) for _ in range(3)]
    await streams[-1].until(lambda: all(s.frames for s in streams))
    await dashboard.close()
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*(s.call for s in streams))  # no browser left: the calls returned
    assert all(s.ended for s in streams)
    late = EventStream(dashboard)
    await late.until(lambda: late.ended)
    assert late.status == 503


def test_the_gateway_stops_on_sigterm_with_an_event_stream_open(
    nats_server: inferbus.EmbeddedServer,
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "inferbus", "gateway", "--servers", nats_server.url,
               "--port", str(port)]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert f"127.0.0.1:{port}" in line, line
            url = f"http://127.0.0.1:{port}{EVENTS_PATH}"
            with httpx.stream("GET", url, timeout=30) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                assert any(text.startswith("data: ") for text in lines)  # the stream is live
                stopped = time.monotonic()
                process.send_signal(signal.SIGTERM)
                assert process.wait(30) == 0
                assert time.monotonic() - stopped < GRACEFUL_SHUTDOWN_S  # ended, not cut off
                list(lines)  # and the response ended cleanly (else httpx raises)
        finally:
            if process.poll() is None:
                process.kill()
