"""Fixtures: a real nats-server on a free port, workers and clients connected to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

import inferbus
from inferbus.pipeline.connection import ConnectOptions

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


async def add_under_load(
    client: inferbus.Client,
    disrupt: Callable[[], object],
    *,
    tasks: int,
    calls: int,
    timeout: float,
    pause: float,
) -> list[inferbus.InferResult]:
    """``tasks`` callers each send ``calls`` requests to add v1; ``disrupt`` runs 0.3 s in."""
    x = {"x": np.ones((1, 4), dtype=np.float32)}

    async def steady() -> list[inferbus.InferResult]:
        results = []
        for _ in range(calls):
            results.append(await client.infer("add", x, version=1, timeout=timeout))
            await asyncio.sleep(pause)
        return results

    load = [asyncio.create_task(steady()) for _ in range(tasks)]
    await asyncio.sleep(0.3)
    disrupt()
    return [result for batch in await asyncio.gather(*load) for result in batch]
