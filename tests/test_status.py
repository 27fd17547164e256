"""``inferbus status``: workers and per-model figures after some traffic."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import orjson
import pytest

import inferbus
from inferbus.status import ClusterStatus, rates, render, snapshot
from tests.conftest import ROOT


async def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI as a child process, without blocking the loop the worker serves on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inferbus", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:  # it hung: leave no process behind
            process.kill()
            await process.wait()
    return process.returncode or 0, out.decode(), err.decode()


@pytest.mark.usefixtures("own_worker")
async def test_status_once_json_after_traffic(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    x = {"x": np.ones((2, 4), dtype=np.float32)}
    for _ in range(5):
        await client.infer("add", x, version=1)
    with pytest.raises(inferbus.EngineFailure):
        await client.infer("failing", {"x": -np.ones((1, 4), dtype=np.float32)})
    code, out, err = await run_cli("status", "--once", "--json", "--servers", nats_server.url)
    assert code == 0, err
    status = orjson.loads(out)
    (worker,) = status["workers"]
    assert "add v1" in worker["models"]
    assert worker["engines"] == ["onnxruntime"]
    models = {(m["name"], m["version"]): m for m in status["models"]}
    add = models[("add", "1")]
    assert (add["workers"], add["requests"], add["errors"]) == (1, 5, 0)
    assert add["mean_batch_size"] == 2.0
    assert add["compute_ms"] > 0
    failing = models[("failing", "1")]
    assert failing["errors_by_code"] == {"500": 1}


@pytest.mark.usefixtures("worker")
async def test_rates_and_the_table(client: inferbus.Client) -> None:
    first = await snapshot(client, timeout=0.2)
    for _ in range(10):
        await client.infer("add", {"x": np.ones((1, 4), dtype=np.float32)}, version=2)
    second = await snapshot(client, timeout=0.2)
    rates(second, first)
    add = next(m for m in second.models if (m.name, m.version) == ("add", "2"))
    assert add.requests_per_s > 0
    table = render(second)
    assert "add v2" in table
    assert "req/s" in table


def test_unfit_workers_are_listed_with_the_reason() -> None:
    from inferbus.status import model_rows

    data = {"request_count": 3, "health": "unhealthy: engine call running for 31s (hung?)"}
    endpoint = {"name": "m_v1", "subject": "inferbus.infer.m.1", "data": data}
    unversioned = {"name": "m", "subject": "inferbus.infer.m", "data": data}  # same counters
    (row,) = model_rows([{"id": "W1", "endpoints": [endpoint, unversioned]}])
    assert (row.name, row.version, row.requests) == ("m", "1", 3)
    assert row.unhealthy == ["W1: unhealthy: engine call running for 31s (hung?)"]
    assert "! W1: unhealthy" in render(ClusterStatus(taken=0, models=[row]))
