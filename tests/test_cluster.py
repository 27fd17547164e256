"""A 3-node NATS cluster on loopback: workers on one node, clients on another; a node dies
under load and every request still succeeds within its budget."""

from __future__ import annotations

import contextlib
import signal
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


def add_v1_requests(worker: inferbus.Worker) -> int:
    return sum(e.num_requests for e in worker.service.endpoints if e.name == "add_v1")


def node_port(worker: inferbus.Worker) -> int | None:
    """The port of the node the worker's connection is on now."""
    url = worker.service.client.connected_url
    return url.port if url is not None else None


async def test_a_node_dies_under_load() -> None:
    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "add"]
    with three_nodes() as (first, second, third):
        urls = [s.url for s in (first, second, third)]
        ordered = ConnectOptions(servers=urls, randomize=False)  # start on the first node
        async with (
            inferbus.Worker(configs, ordered) as one,
            inferbus.Worker(configs, ordered) as two,
            inferbus.connect([second.url, third.url]) as client,
        ):
            await wait_for_workers(client, "add", 2)
            workers = (one, two)
            before: list[int] = []

            async def kill_their_node() -> None:
                before.extend(add_v1_requests(w) for w in workers)
                first.kill()

            # The workers' node dies under load.
            load = await add_under_load(client, kill_their_node, tasks=4, calls=80, timeout=5)
            after = [add_v1_requests(w) for w in workers]
            ports = {node_port(w) for w in workers}
        exit_code = first.wait()
    assert len(load.results) == 320
    assert all(np.array_equal(r["y"], np.full((1, 4), 2.0)) for r in load.results)
    # The node died of the kill, with requests answered before it and sent after it...
    assert exit_code == -signal.SIGKILL
    assert load.done_before > 0
    assert load.sent_after > 0
    # ...and the workers answered every one sent after it, through the surviving nodes.
    assert ports <= {second.port, third.port}
    assert sum(after) - sum(before) >= load.sent_after
