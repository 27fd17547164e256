"""The worker's Prometheus endpoint serves the documented series with plausible values."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import numpy as np
import pytest

import inferbus
from inferbus.natsserver import free_port
from tests.conftest import TEST_MODELS, worker_options


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def value(text: str, series: str) -> float:
    """The sample of one series (name and labels exactly as exposed) in a scrape."""
    for line in text.splitlines():
        name, _, number = line.rpartition(" ")
        if name == series:
            return float(number)
    raise AssertionError(f"{series} not in the scrape")


async def test_metrics_after_traffic(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name in ("add", "failing")]
    port = free_port()
    async with inferbus.Worker(configs, worker_options(nats_server), metrics_port=port):
        for _ in range(3):
            await client.infer("add", {"x": np.ones((2, 4), dtype=np.float32)}, version=1)
        with pytest.raises(inferbus.EngineFailure):
            await client.infer("failing", {"x": -np.ones((1, 4), dtype=np.float32)})
        text = await asyncio.to_thread(scrape, port)
    add = '{model="add",version="1"}'
    assert value(text, f"inferbus_request_success_total{add}") == 3
    assert value(text, f"inferbus_inference_count_total{add}") == 3
    assert value(text, f"inferbus_execution_count_total{add}") == 3
    assert value(text, f"inferbus_compute_duration_us_total{add}") > 0
    assert value(text, f"inferbus_queue_duration_us_total{add}") >= 0
    assert value(text, f"inferbus_pending_request_count{add}") == 0
    failed = '{code="500",model="failing",version="1"}'
    assert value(text, f"inferbus_request_failure_total{failed}") == 1
    with pytest.raises(urllib.error.URLError):  # the endpoint closes with the worker
        await asyncio.to_thread(scrape, port)
