"""Tensors larger than max_payload: chunked both ways, bounded, checked, and cleaned up."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import urllib.request
import zlib
from collections.abc import AsyncIterator, Iterator

import nats
import numpy as np
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError

import inferbus
from inferbus.codecs import InferRequest, decode_response, encode_request
from inferbus.natsserver import free_port
from inferbus.pipeline import transfer
from inferbus.pipeline.connection import ConnectOptions
from tests.conftest import TEST_MODELS, RecordingPolicy, eventually
from tests.test_worker_lifecycle import start_worker_process, wait_until_served

ONE_MB = 1024 * 1024


@pytest.fixture
def small_server() -> Iterator[inferbus.EmbeddedServer]:
    """NATS's own default: 1 MB messages at most (and the monitoring endpoint)."""
    with inferbus.EmbeddedServer(max_payload=ONE_MB, monitor_port=free_port()) as server:
        yield server
        print(f"--- nats-server log ({server.url}) ---\n{server.log_text()}")


def subscriptions_of(server: inferbus.EmbeddedServer, client: NatsClient) -> int:
    """How many subscriptions the server holds for ``client``'s connection (its /connz)."""
    url = f"http://{server.host}:{server.monitor_port}/connz?cid={client.client_id}"
    with urllib.request.urlopen(url, timeout=5) as response:
        (connection,) = orjson.loads(response.read())["connections"]
    return int(connection["subscriptions"])


class ChunkWatch:
    """Every message the server routes, seen through one wildcard subscription of ``raw``:
    how many of them were chunks of a transfer?"""

    END = "tests.chunk-watch.end"

    def __init__(self, raw: NatsClient) -> None:
        self.raw = raw
        self.chunks = 0
        self.first_chunk = asyncio.Event()
        self._ended = asyncio.Event()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self.raw.subscribe(">", cb=self._see)
        await self.raw.flush()

    async def _see(self, msg: Msg) -> None:
        if msg.subject == self.END:
            self._ended.set()
        elif msg.headers and transfer.CHUNK_HEADER in msg.headers:
            self.chunks += 1
            self.first_chunk.set()

    async def stop(self, *, see_everything: bool = True) -> None:
        """Unsubscribe; first, with ``see_everything``, take in every message routed so far
        (they reach this subscription in order, before a message published after them)."""
        if see_everything:
            await self.raw.publish(self.END, b"")
            await asyncio.wait_for(self._ended.wait(), 10)
        assert self._subscription is not None
        await self._subscription.unsubscribe()


def big_identity() -> inferbus.ModelConfig:
    return dataclasses.replace(inferbus.load_model_config(TEST_MODELS / "blob"), name="big")


@pytest.fixture
async def big_worker(small_server: inferbus.EmbeddedServer) -> AsyncIterator[inferbus.Worker]:
    options = ConnectOptions(servers=[small_server.url])
    async with inferbus.Worker([big_identity()], options) as worker:
        yield worker


def blob(mib: float) -> dict[str, np.ndarray]:
    rows = int(mib * 1024)
    return {"x": np.random.default_rng(rows).integers(0, 256, (rows, 1024), dtype=np.uint8)}


@pytest.mark.usefixtures("big_worker")
async def test_64_mib_tensor_through_a_1_mb_server_both_ways(
    small_server: inferbus.EmbeddedServer,
) -> None:
    inputs = blob(64)
    async with inferbus.connect(small_server.url) as client:
        result = await client.infer("big", inputs, timeout=60)
        np.testing.assert_array_equal(result["y"], inputs["x"])
        assert transfer.Receiver.active == 0
        small = await client.infer("big", blob(0.01), timeout=5)  # small ones are unchanged
        assert small["y"].shape == (10, 1024)


@pytest.mark.usefixtures("big_worker")
async def test_too_large_for_the_model_is_refused_before_any_chunk(
    small_server: inferbus.EmbeddedServer, raw_small: NatsClient
) -> None:
    config = dataclasses.replace(big_identity(), name="capped", max_request_bytes=2 * ONE_MB)
    options = ConnectOptions(servers=[small_server.url])
    watch = ChunkWatch(raw_small)
    await watch.start()
    async with inferbus.Worker([config], options), inferbus.connect(small_server.url) as client:
        with pytest.raises(inferbus.PayloadTooLarge, match="exceeds the limit"):
            await client.infer("capped", blob(4), timeout=30)
        await watch.stop()
    assert watch.chunks == 0
    assert transfer.Receiver.active == 0


@pytest.fixture
async def raw_small(small_server: inferbus.EmbeddedServer) -> AsyncIterator[NatsClient]:
    connection = await nats.connect(small_server.url)
    yield connection
    await connection.close()


def offer_body(size: int, chunk: int, timeout_s: float, **extra: object) -> bytes:
    """A request's transfer offer; ``extra`` fields added to its JSON as they are."""
    offer = transfer.Offer(size, chunk, timeout_s)
    if not extra:
        return offer.body()
    fields = {**transfer.transfer_json(offer.body()), **extra}
    json = orjson.dumps({"transfer": fields})
    return len(json).to_bytes(4, "little") + json


@pytest.mark.usefixtures("big_worker")
async def test_a_corrupt_chunk_is_refused(raw_small: NatsClient) -> None:
    headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
    answer = await raw_small.request(
        "inferbus.infer.big", offer_body(10, 10, 5.0), headers=headers, timeout=5
    )
    subject = transfer.transfer_json(answer.data)["subject"]
    ack = await raw_small.request(
        subject, b"0123456789", headers={transfer.CHUNK_HEADER: "0 12345"}, timeout=5
    )
    assert ack.headers is not None
    assert ack.headers["Nats-Service-Error-Code"] == "400"
    assert "checksum" in ack.headers["Nats-Service-Error"]


async def test_an_abandoned_transfer_is_freed(
    big_worker: inferbus.Worker, raw_small: NatsClient
) -> None:
    headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
    body = encode_request(InferRequest("x", blob(2)))
    answer = await raw_small.request(
        "inferbus.infer.big",
        offer_body(len(body), 64 * 1024, 0.3),
        headers=headers,
        timeout=5,
    )
    assert not answer.headers  # accepted; then the sender goes quiet
    assert transfer.Receiver.active == 1
    await eventually(lambda: transfer.Receiver.active == 0, "the transfer was abandoned")
    (model,) = big_worker.models
    assert model.stats_data()["errors_by_code"] == {"504": 1}


async def test_worker_killed_midway_fails_fast_and_leaks_nothing(
    small_server: inferbus.EmbeddedServer, raw_small: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks in flight to a dead worker are never acknowledged: each waits this long.
    monkeypatch.setattr(transfer, "CHUNK_ACK_S", 1.0)
    process = start_worker_process(small_server.url, "slow")
    policy = RecordingPolicy()
    async with inferbus.connect(small_server.url, retry=policy) as client:
        await wait_until_served(client, "slow")
        await client.infer("slow", {"x": np.zeros((1, 4), dtype=np.float32)})
        subscriptions = subscriptions_of(small_server, client.nats)
        watch = ChunkWatch(raw_small)
        await watch.start()
        x = {"x": np.zeros((1 << 20, 4), dtype=np.float32)}  # 16 MiB: 17 chunks
        call = asyncio.create_task(client.infer("slow", x, timeout=30))
        await asyncio.wait_for(watch.first_chunk.wait(), 30)  # the worker took the offer
        await watch.stop(see_everything=False)
        process.send_signal(signal.SIGKILL)
        # The transfer fails ("went away"); the retry then finds no worker at all.
        with pytest.raises((inferbus.Unavailable, inferbus.ModelNotFound)):
            await call
        await client.nats.flush()
        assert subscriptions_of(small_server, client.nats) == subscriptions
    process.communicate()  # reaps it and closes its pipe
    # Not the 30 s budget: the dead worker was noticed, and the policy gave up.
    assert policy.decisions[0] == (inferbus.Unavailable, True)
    assert policy.decisions[-1][1] is False
    assert transfer.Receiver.active == 0


@pytest.mark.usefixtures("big_worker")
@pytest.mark.parametrize(
    ("size", "chunk", "extra", "message"),
    [
        (1 << 20, 16, {}, "at least 4096 bytes"),
        # The protocol before commits: refused at once, not abandoned after a timeout.
        (1 << 20, 1 << 16, {"reply": "_INBOX.x.y"}, "takes a commit instead"),
    ],
)
async def test_unusable_offers_are_refused(
    raw_small: NatsClient, size: int, chunk: int, extra: dict[str, object], message: str
) -> None:
    headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
    answer = await raw_small.request(
        "inferbus.infer.big", offer_body(size, chunk, 5.0, **extra), headers=headers, timeout=5
    )
    assert answer.headers is not None
    assert answer.headers["Nats-Service-Error-Code"] == "400"
    assert message in answer.headers["Nats-Service-Error"]
    assert transfer.Receiver.active == 0


# --- the commit, and replies fetched chunk by chunk (PROTOCOL.md 13.1, 13.2) ---------------------

COMMIT = {transfer.CHUNK_HEADER: transfer.COMMIT}


def chunk_headers(index: int, part: bytes) -> dict[str, str]:
    return {transfer.CHUNK_HEADER: f"{index} {zlib.crc32(part)}"}


async def open_transfer(raw: NatsClient, size: int, chunk: int) -> str:
    """Offer a request transfer to ``big`` by hand; the transfer subject it was given."""
    headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
    answer = await raw.request(
        "inferbus.infer.big", offer_body(size, chunk, 10.0), headers=headers, timeout=5
    )
    assert not answer.headers, answer.headers
    subject = str(transfer.transfer_json(answer.data)["subject"])
    assert subject.startswith("inferbus.transfer.")
    return subject


def zeros_request(mib: float, *, timeout_s: float | None = None) -> bytes:
    """A request of a few hundred bytes (zstd) whose identity reply is ``mib`` MiB."""
    x = np.zeros((int(mib * 1024), 1024), dtype=np.uint8)
    timeout_us = None if timeout_s is None else int(timeout_s * 1e6)
    return encode_request(InferRequest("zeros", {"x": x}, timeout_us=timeout_us), "zstd")


async def reply_offer(raw: NatsClient, body: bytes) -> Msg:
    """Send a one-message request whose reply is a transfer offer; the offer."""
    offer = await raw.request("inferbus.infer.big", body, timeout=10)
    assert transfer.is_offer(offer), offer.headers
    return offer


def errors_of(worker: inferbus.Worker) -> dict[str, int]:
    (model,) = worker.models
    errors: dict[str, int] = model.stats_data()["errors_by_code"]
    return errors


async def test_a_commit_before_every_chunk_is_refused(
    big_worker: inferbus.Worker, raw_small: NatsClient
) -> None:
    part = bytes(4096)
    subject = await open_transfer(raw_small, 2 * len(part), len(part))
    ack = await raw_small.request(subject, part, headers=chunk_headers(0, part), timeout=5)
    assert not ack.headers
    assert ack.data == b""
    answer = await raw_small.request(subject, b"", headers=COMMIT, timeout=5)
    assert answer.headers is not None
    assert answer.headers["Nats-Service-Error-Code"] == "400"
    assert "commit with 1 of 2 chunks missing" in answer.headers["Nats-Service-Error"]
    await eventually(lambda: transfer.Receiver.active == 0, "the transfer was freed")
    assert errors_of(big_worker) == {"400": 1}


@pytest.mark.usefixtures("big_worker")
async def test_a_commit_is_answered_with_the_reply(raw_small: NatsClient) -> None:
    """By hand, as a client in another language would: offer, chunks, commit; the commit's
    answer is the response (here an offer to fetch it: it is as large as the request)."""
    inputs = blob(1.5)
    body = encode_request(InferRequest("by-hand", inputs))
    chunk = ONE_MB - 4096  # as the client cuts it for this server
    subject = await open_transfer(raw_small, len(body), chunk)
    for index in range(-(-len(body) // chunk)):
        part = body[index * chunk : (index + 1) * chunk]
        ack = await raw_small.request(subject, part, headers=chunk_headers(index, part), timeout=5)
        assert not ack.headers
        assert ack.data == b""
    answer = await raw_small.request(subject, b"", headers=COMMIT, timeout=10)
    assert transfer.is_offer(answer), answer.headers
    reply = await transfer.fetch(raw_small, answer, 64 * ONE_MB, timeout=10)
    np.testing.assert_array_equal(decode_response(reply).outputs["y"], inputs["x"])
    assert transfer.Receiver.active == 0


async def test_a_reply_is_fetched_chunk_by_chunk_and_then_freed(
    big_worker: inferbus.Worker, raw_small: NatsClient
) -> None:
    offer_msg = await reply_offer(raw_small, zeros_request(2.5))
    offer = transfer.Offer.parse(offer_msg.data)
    assert offer.subject.startswith("inferbus.transfer.")
    assert offer.chunks == 3
    assert offer_msg.reply == ""  # the offer is the one reply; it asks for nothing back
    assert transfer.ReplyServer.active == 1
    body = await transfer.fetch(raw_small, offer_msg, 64 * ONE_MB, timeout=10)
    response = decode_response(body)
    assert response.id == "zeros"
    assert response.outputs["y"].shape == (2560, 1024)
    await eventually(lambda: transfer.ReplyServer.active == 0, "the reply was freed")
    (model,) = big_worker.models
    await model.replier.nats.flush()  # its UNSUB has reached the server
    with pytest.raises(NoRespondersError):  # every chunk was fetched: the subject is gone
        await raw_small.request(offer.subject, b"", headers={transfer.CHUNK_HEADER: "0"})
    assert errors_of(big_worker) == {}


@pytest.mark.usefixtures("big_worker")
@pytest.mark.parametrize(
    ("fetch", "message"),
    [("3", "chunk 3 is past the last one (2)"), ("one", "fetch lacks a valid Inferbus-Chunk")],
)
async def test_a_bad_fetch_is_refused_and_ends_the_reply(
    raw_small: NatsClient, fetch: str, message: str
) -> None:
    offer = transfer.Offer.parse((await reply_offer(raw_small, zeros_request(2.5))).data)
    headers = {transfer.CHUNK_HEADER: fetch}
    answer = await raw_small.request(offer.subject, b"", headers=headers, timeout=5)
    assert answer.headers is not None
    assert answer.headers["Nats-Service-Error-Code"] == "400"
    assert message in answer.headers["Nats-Service-Error"]
    await eventually(lambda: transfer.ReplyServer.active == 0, "the reply was freed")


async def test_a_reply_too_large_for_the_client_is_cancelled_at_once(
    small_server: inferbus.EmbeddedServer, big_worker: inferbus.Worker
) -> None:
    async with inferbus.connect(small_server.url, max_reply_bytes=ONE_MB) as client:
        with pytest.raises(inferbus.PayloadTooLarge, match="exceeds the limit"):
            await client.infer("big", {"x": np.zeros((2048, 1024), np.uint8)}, codec="zstd")
    # Freed by the client's cancel, well before the worker's 10 s without a fetch.
    await eventually(lambda: transfer.ReplyServer.active == 0, "the reply was freed", tries=250)
    assert errors_of(big_worker) == {"413": 1}


async def test_a_reply_nobody_fetches_is_freed(
    big_worker: inferbus.Worker, raw_small: NatsClient
) -> None:
    await reply_offer(raw_small, zeros_request(2.5, timeout_s=0.5))  # kept for at least 1 s
    assert transfer.ReplyServer.active == 1
    await eventually(lambda: transfer.ReplyServer.active == 0, "the reply was freed", tries=250)
    assert errors_of(big_worker) == {"504": 1}


async def test_a_corrupt_reply_chunk_is_refused_by_the_client(
    small_server: inferbus.EmbeddedServer, raw_small: NatsClient
) -> None:
    """A fake worker whose reply's chunk does not match its checksum."""
    part = bytes(8192)
    subject = "inferbus.transfer.corrupt"

    async def serve_chunk(msg: Msg) -> None:
        await raw_small.publish(msg.reply, part, headers={transfer.CHUNK_HEADER: "0 1"})

    async def offer_reply(msg: Msg) -> None:
        offer = transfer.Offer(len(part), len(part), 5.0, subject)
        headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
        await raw_small.publish(msg.reply, offer.body(), headers=headers)

    await raw_small.subscribe(subject, cb=serve_chunk)
    await raw_small.subscribe("inferbus.infer.fake", cb=offer_reply)
    await raw_small.flush()
    async with inferbus.connect(small_server.url) as client:
        with pytest.raises(inferbus.EngineFailure, match="chunk 0 fails its checksum"):
            await client.infer("fake", {"x": np.zeros((1, 4), np.float32)}, timeout=5)
