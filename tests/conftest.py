"""Fixtures: a real nats-server on a free port, workers and clients connected to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

import inferbus
from inferbus.pipeline._connection import ConnectOptions

ROOT = Path(__file__).resolve().parent.parent
TEST_MODELS = ROOT / "tests" / "models"
EXAMPLE_MODELS = ROOT / "examples" / "models"


@pytest.fixture
def nats_server() -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer() as server:
        yield server
        # pytest shows this only when the test failed: the server's view of what happened.
        print(f"--- nats-server log ({server.url}) ---\n{server.log_text()}")


def worker_options(server: inferbus.EmbeddedServer) -> ConnectOptions:
    return ConnectOptions(servers=[server.url], name="test-worker")


@pytest.fixture
async def worker(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[inferbus.Worker]:
    configs = inferbus.load_repository(TEST_MODELS)
    async with inferbus.Worker(configs, worker_options(nats_server)) as running:
        yield running


@pytest.fixture
async def client(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[inferbus.Client]:
    async with inferbus.connect(nats_server.url) as connected:
        yield connected


@pytest.fixture
async def raw_nats(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection, for sending bytes no inferbus client would send."""
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.close()


async def wait_for_workers(client: inferbus.Client, model: str, count: int) -> None:
    """Until ``count`` workers announce ``model`` (a worker subscribes before it announces)."""
    for _ in range(200):
        found = [m for m in await client.models(timeout=0.1) if m.name == model]
        if found and min(len(m.workers) for m in found) >= count:
            return
    raise AssertionError(f"{count} workers never served {model}")
