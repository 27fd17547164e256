"""Tensors larger than max_payload: chunked both ways, bounded, checked, and cleaned up."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator

import nats
import numpy as np
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

import inferbus
from inferbus.codecs import InferRequest, encode_request
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


def offer_body(size: int, chunk: int, timeout_s: float, reply: str = "") -> bytes:
    return transfer.Offer(size, chunk, timeout_s, reply).body()


@pytest.mark.usefixtures("big_worker")
async def test_a_corrupt_chunk_is_refused(raw_small: NatsClient) -> None:
    headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
    answer = await raw_small.request(
        "inferbus.infer.big", offer_body(10, 10, 5.0, "nowhere"), headers=headers, timeout=5
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
        offer_body(len(body), 64 * 1024, 0.3, "nowhere"),
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
    ("size", "chunk", "reply", "message"),
    [
        (1 << 20, 16, "inbox", "at least 4096 bytes"),
        (1 << 20, 1 << 16, "", "must name its reply subject"),
    ],
)
async def test_unusable_offers_are_refused(
    raw_small: NatsClient, size: int, chunk: int, reply: str, message: str
) -> None:
    headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
    answer = await raw_small.request(
        "inferbus.infer.big", offer_body(size, chunk, 5.0, reply), headers=headers, timeout=5
    )
    assert answer.headers is not None
    assert answer.headers["Nats-Service-Error-Code"] == "400"
    assert message in answer.headers["Nats-Service-Error"]
    assert transfer.Receiver.active == 0
