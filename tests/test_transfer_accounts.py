"""Chunked transfers on a shared bus: each user in a NATS account of their own, the workers in
account INFERBUS, which exports the platform's subjects as services (PROTOCOL.md 13, 14).

There a worker can publish only the one reply to each message it received (its user may
publish to ``_INBOX.>`` and answer, nothing else), and a user only to what their account
imports: the transfers work all the same, and a transfer answers only the account that opened
it.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import AsyncIterator, Iterator

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import inferbus
from inferbus.codecs import InferRequest, decode_response, encode_request
from inferbus.pipeline import transfer
from inferbus.pipeline.connection import ConnectOptions
from tests.conftest import eventually
from tests.test_transfer import big_identity, blob

MAX_PAYLOAD = 64 * 1024
FORBIDDEN = "Nats-Service-Error-Code"

IMPORTS = """
    imports: [
      {service: {account: INFERBUS, subject: "inferbus.infer.>"}, share: true}
      {service: {account: INFERBUS, subject: "inferbus.transfer.>"}, share: true}
      {service: {account: INFERBUS, subject: "$SRV.>"}, share: true}
    ]"""

ACCOUNTS = f"""
accounts {{
  INFERBUS {{
    users: [
      {{user: w, password: w,
       permissions: {{publish: {{allow: ["_INBOX.>"]}}, allow_responses: true}}}}
    ]
    exports: [
      {{service: "inferbus.infer.>"}}
      {{service: "inferbus.transfer.>"}}
      {{service: "$SRV.>", response_type: stream}}
    ]
  }}
  ALICE {{
    users: [{{user: alice, password: alice}}, {{user: alice2, password: alice2}}]{IMPORTS}
  }}
  BOB {{
    users: [{{user: bob, password: bob}}]{IMPORTS}
  }}
}}
"""


@pytest.fixture
def shared_bus() -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer(max_payload=MAX_PAYLOAD, extra_config=ACCOUNTS) as server:
        yield server
        log = server.log_text()
        print(f"--- nats-server log ---\n{log[-4000:]}")
        # The worker published nothing but replies, and nobody published outside their rights.
        assert "Permissions Violation" not in log


def url(server: inferbus.EmbeddedServer, user: str) -> str:
    return f"nats://{user}:{user}@{server.host}:{server.port}"


def worker(server: inferbus.EmbeddedServer, *configs: inferbus.ModelConfig) -> inferbus.Worker:
    return inferbus.Worker(configs or [big_identity()], ConnectOptions(servers=[url(server, "w")]))


@pytest.fixture
async def big_worker(shared_bus: inferbus.EmbeddedServer) -> AsyncIterator[inferbus.Worker]:
    async with worker(shared_bus) as served:
        yield served


@pytest.fixture
async def alice(shared_bus: inferbus.EmbeddedServer) -> AsyncIterator[NatsClient]:
    connection = await nats.connect(url(shared_bus, "alice"))
    yield connection
    await connection.close()


@pytest.fixture
async def bob(shared_bus: inferbus.EmbeddedServer) -> AsyncIterator[NatsClient]:
    connection = await nats.connect(url(shared_bus, "bob"))
    yield connection
    await connection.close()


def error_code(msg: Msg) -> str | None:
    return (msg.headers or {}).get(FORBIDDEN)


@pytest.mark.usefixtures("big_worker")
async def test_large_requests_and_replies_cross_the_accounts(
    shared_bus: inferbus.EmbeddedServer,
) -> None:
    inputs = blob(1)  # 1 MiB each way: 16 chunks of a 64 KiB server
    zeros = {"x": np.zeros((1024, 1024), dtype=np.uint8)}  # a small request (zstd), a large reply
    async with inferbus.connect(url(shared_bus, "alice")) as client:
        assert client.nats.max_payload == MAX_PAYLOAD
        result = await client.infer("big", inputs, timeout=20)
        np.testing.assert_array_equal(result["y"], inputs["x"])
        result = await client.infer("big", zeros, codec="zstd", timeout=20)
        np.testing.assert_array_equal(result["y"], zeros["x"])
        small = await client.infer("big", blob(0.01), timeout=5)  # one message each way
        assert small["y"].shape == (10, 1024)
    await eventually(lambda: transfer.ReplyServer.active == 0, "every reply was freed")
    assert transfer.Receiver.active == 0


async def test_another_account_cannot_touch_a_request_transfer(
    alice: NatsClient, bob: NatsClient, big_worker: inferbus.Worker
) -> None:
    inputs = blob(0.25)
    body = encode_request(InferRequest("alice", inputs))
    target = await transfer.upload(alice, "inferbus.infer.big", body, timeout=10)
    # Bob overwrites chunk 0 with a chunk of his own (its checksum right), then commits.
    evil = bytes(transfer.chunk_size(alice.max_payload))
    headers = {transfer.CHUNK_HEADER: f"0 {zlib.crc32(evil)}"}
    for payload, sent in ((evil, headers), (b"", {transfer.CHUNK_HEADER: transfer.COMMIT})):
        answer = await bob.request(target, payload, headers=sent, timeout=5)
        assert error_code(answer) == "403"
        assert "belongs to another account" in (answer.headers or {})["Nats-Service-Error"]
    commit = {transfer.CHUNK_HEADER: transfer.COMMIT}
    reply = await alice.request(target, b"", headers=commit, timeout=10)
    assert transfer.is_offer(reply), reply.headers  # 256 KiB: fetched in chunks
    data = await transfer.fetch(alice, reply, 1 << 30, timeout=10)
    np.testing.assert_array_equal(decode_response(data).outputs["y"], inputs["x"])
    (model,) = big_worker.models
    assert model.stats_data()["errors_by_code"] == {}


@pytest.mark.parametrize("request_sent_in_chunks", [True, False])
async def test_another_account_cannot_fetch_a_reply(
    alice: NatsClient, bob: NatsClient, big_worker: inferbus.Worker, request_sent_in_chunks: bool
) -> None:
    zeros = np.zeros((256, 1024), dtype=np.uint8)  # 256 KiB: a reply in 5 chunks
    if request_sent_in_chunks:
        body = encode_request(InferRequest("alice", {"x": zeros}))
        reply = await transfer.send(alice, "inferbus.infer.big", body, timeout=10)
    else:
        body = encode_request(InferRequest("alice", {"x": zeros}), "zstd")
        reply = await alice.request("inferbus.infer.big", body, timeout=10)
    assert transfer.is_offer(reply), reply.headers
    offer = transfer.Offer.parse(reply.data)
    # Bob fetches every chunk and cancels: refused, and none of it counts.
    for index in range(offer.chunks):
        headers = {transfer.CHUNK_HEADER: str(index)}
        answer = await bob.request(offer.subject, b"", headers=headers, timeout=5)
        assert error_code(answer) == "403"
    # Flushed: the server routes the cancel to the worker before Alice's first fetch.
    await bob.publish(offer.subject, b"", headers={transfer.CHUNK_HEADER: transfer.CANCEL})
    await bob.flush()
    data = await transfer.fetch(alice, reply, 1 << 30, timeout=10)
    np.testing.assert_array_equal(decode_response(data).outputs["y"], zeros)
    await eventually(lambda: transfer.ReplyServer.active == 0, "the reply was freed")
    (model,) = big_worker.models
    assert model.stats_data()["errors_by_code"] == {}


async def test_the_transfer_budget_is_per_account(shared_bus: inferbus.EmbeddedServer) -> None:
    """Two transfers of the largest size at once, one per account: Alice's second connection
    shares her half (on an open bus each connection would have one of its own)."""
    limit = 256 * 1024
    config = dataclasses.replace(big_identity(), max_request_bytes=limit)
    headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
    # Offers that nobody follows up: each accepted one is abandoned after a second.
    offer = transfer.Offer(limit, transfer.chunk_size(MAX_PAYLOAD), 1.0).body()
    codes = []
    async with worker(shared_bus, config) as served:
        for user in ("alice", "alice2", "bob"):
            connection = await nats.connect(url(shared_bus, user))
            try:
                subject = "inferbus.infer.big"
                answer = await connection.request(subject, offer, headers=headers, timeout=5)
            finally:
                await connection.close()
            codes.append(error_code(answer))
        assert codes == [None, "429", None]
        assert transfer.Receiver.active == 2
        await eventually(lambda: transfer.Receiver.active == 0, "both were abandoned")
        (model,) = served.models
        assert model.stats_data()["errors_by_code"] == {"429": 1, "504": 2}
