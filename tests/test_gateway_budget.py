"""The gateway's in-flight byte budget: many large bodies at once are refused with 429 (and a
Retry-After) rather than held in memory together, and every request gives its share back —
answered, refused or failed. The gateway runs in-process (httpx's ASGI transport) against the
shared worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

import inferbus
from inferbus.gateway.app import Gateway, GatewaySettings
from inferbus.gateway.identities import OneIdentity
from inferbus.pipeline.transport import Transport

MIB = 1 << 20
SLOW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def padded(request: object, size: int) -> bytes:
    """``request`` as JSON, padded with whitespace (still valid JSON) to ``size`` bytes."""
    text = orjson.dumps(request)
    return text + b" " * (size - len(text))


@pytest.fixture
async def budgeted(
    shared_server: inferbus.EmbeddedServer, shared_worker: inferbus.Worker
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway that takes bodies up to 1 MiB and holds 1.5 MiB of them at once."""
    transport = await Transport.open(inferbus.ConnectOptions(servers=[shared_server.url]))
    settings = GatewaySettings(max_body_bytes=MIB, max_inflight_bytes=MIB + MIB // 2)
    gateway = Gateway(OneIdentity(transport), settings)
    asgi = httpx.ASGITransport(app=gateway.app())
    async with httpx.AsyncClient(transport=asgi, base_url="http://gateway", timeout=30) as http:
        yield gateway, http
    await transport.close()


async def test_bodies_past_the_budget_get_429_and_shares_come_back(
    budgeted: tuple[Gateway, httpx.AsyncClient],
) -> None:
    gateway, http = budgeted
    body = padded(SLOW, 900 * 1024)
    taken, rest = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        """The first body without a declared length: 700 KiB now, the rest when let go."""
        yield body[: 700 * 1024]
        taken.set()  # the gateway asks for more once it has counted the first part
        await rest.wait()
        yield body[700 * 1024 :]

    first = asyncio.create_task(http.post("/v2/models/slow/infer", content=stalled()))
    await taken.wait()
    assert gateway.budget.held == 700 * 1024  # counted chunk by chunk as it arrives
    second = await http.post("/v2/models/slow/infer", content=body)  # declares 900 KiB
    assert second.status_code == 429
    assert second.headers["Retry-After"] == "1"
    assert "budget" in second.json()["error"]
    assert gateway.budget.held == 700 * 1024  # the refused one took nothing
    rest.set()
    assert (await first).status_code == 200
    assert gateway.budget.held == 0
    again = await http.post("/v2/models/slow/infer", content=body)
    assert again.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/add/infer", b"{not json" + b" " * 1000, 400),
        ("/v2/models/nope/infer", padded(SLOW, 5000), 404),
        ("/v2/models/add/infer", b" " * (MIB + 1), 413),
    ],
)
async def test_refused_requests_give_their_share_back(
    budgeted: tuple[Gateway, httpx.AsyncClient], path: str, body: bytes, status: int
) -> None:
    gateway, http = budgeted
    reply = await http.post(path, content=body)
    assert reply.status_code == status
    assert gateway.budget.held == 0


def test_the_budget_must_hold_one_largest_body() -> None:
    with pytest.raises(inferbus.BadInput, match="in-flight budget"):
        GatewaySettings(max_body_bytes=2 * MIB, max_inflight_bytes=MIB)


async def test_a_body_that_trickles_past_its_budget_is_408(
    budgeted: tuple[Gateway, httpx.AsyncClient],
) -> None:
    """A caller that sends part of a body and stalls holds its share only for the request's
    time budget (here the least the gateway allows, a second), then gets 408."""
    gateway, http = budgeted
    body = padded(SLOW, 700 * 1024)
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield body[: 300 * 1024]
        await never.wait()
        yield body[300 * 1024 :]

    reply = await http.post("/v2/models/slow/infer", content=stalled(),
                            headers={"Inferbus-Timeout-Us": "0"})  # fmt: skip
    assert reply.status_code == 408
    assert "307200 bytes came" in reply.json()["error"]
    assert gateway.budget.held == 0
