"""A 3-node NATS cluster on loopback: workers on one node, clients on another; a node dies
under load and every request still succeeds within its budget."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

import inferbus
from inferbus.natsserver import Cluster, EmbeddedServer, free_port
from inferbus.pipeline.connection import ConnectOptions
from tests.conftest import TEST_MODELS, add_under_load, wait_for_workers


@contextlib.contextmanager
def three_nodes() -> Iterator[list[EmbeddedServer]]:
    routes = [free_port() for _ in range(3)]
    servers = [
        EmbeddedServer(
            cluster=Cluster(f"n{i}", routes[i], tuple(p for p in routes if p != routes[i]))
        )
        for i in range(3)
    ]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server)
        yield servers


async def test_a_node_dies_under_load() -> None:
    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "add"]
    with three_nodes() as (first, second, third):
        urls = [s.url for s in (first, second, third)]
        ordered = ConnectOptions(servers=urls, randomize=False)  # start on the first node
        async with (
            inferbus.Worker(configs, ordered),
            inferbus.Worker(configs, ordered),
            inferbus.connect([second.url, third.url]) as client,
        ):
            await wait_for_workers(client, "add", 2)
            # The workers' node dies under load.
            results = await add_under_load(
                client, first.kill, tasks=4, calls=80, timeout=5, pause=0.01
            )
    assert len(results) == 320
    assert all(np.array_equal(r["y"], np.full((1, 4), 2.0)) for r in results)
    print(f"{sum(r.attempts > 1 for r in results)} of 320 requests needed a retry")
