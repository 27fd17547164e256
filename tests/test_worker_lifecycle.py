"""A worker process: discovery over $SRV, and a drain on SIGTERM that loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import numpy as np
import orjson
import pytest
from nats.aio.client import Client as NatsClient

import inferbus
from inferbus.pipeline.discovery import gather
from tests.conftest import ROOT, TEST_MODELS


@pytest.mark.usefixtures("own_worker")
async def test_srv_ping_info_stats_carry_model_metadata(
    raw_nats: NatsClient, client: inferbus.Client
) -> None:
    await client.infer("add", {"x": np.ones((1, 4), dtype=np.float32)}, version=1)
    ping = orjson.loads((await raw_nats.request("$SRV.PING.inferbus", b"", timeout=2)).data)
    assert ping["type"] == "io.nats.micro.v1.ping_response"
    assert ping["name"] == "inferbus"

    info = orjson.loads((await raw_nats.request("$SRV.INFO", b"", timeout=2)).data)
    assert info["type"] == "io.nats.micro.v1.info_response"
    endpoints = {e["name"]: e for e in info["endpoints"]}
    add_v1 = endpoints["add_v1"]
    assert add_v1["subject"] == "inferbus.infer.add.1"
    assert add_v1["queue_group"] == "add.1"
    assert add_v1["metadata"]["version"] == "1"
    signature = orjson.loads(add_v1["metadata"]["signature"])
    assert signature["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    # The unversioned subject goes to this worker's latest version only.
    assert endpoints["add"]["metadata"]["version"] == "2"
    assert "add_v2" in endpoints

    stats = orjson.loads((await raw_nats.request(f"$SRV.STATS.inferbus.{ping['id']}", b"")).data)
    assert stats["type"] == "io.nats.micro.v1.stats_response"
    add_stats = {e["name"]: e for e in stats["endpoints"]}["add_v1"]
    assert add_stats["num_requests"] == 1
    assert add_stats["num_errors"] == 0
    assert add_stats["data"]["inference_count"] == 1


async def test_two_workers_both_answer_discovery(nats_server: inferbus.EmbeddedServer) -> None:
    from tests.conftest import worker_options

    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "echo"]
    async with (
        inferbus.Worker(configs, worker_options(nats_server)),
        inferbus.Worker(configs, worker_options(nats_server)),
        inferbus.connect(nats_server.url) as client,
    ):
        replies = await gather(client.nats, "$SRV.PING.inferbus", timeout=0.3)
        (echo,) = await client.models()
    assert len({r["id"] for r in replies}) == 2
    assert len(echo.workers) == 2


def start_worker_process(url: str, *models: str) -> subprocess.Popen[bytes]:
    flags = [arg for model in models for arg in ("--model", model)]
    command = [sys.executable, "-m", "inferbus", "worker", str(TEST_MODELS), *flags]
    return subprocess.Popen(
        [*command, "--servers", url],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def wait_until_served(client: inferbus.Client, name: str) -> None:
    for _ in range(200):
        if any(m.name == name for m in await client.models(timeout=0.1)):
            return
    raise AssertionError(f"{name} never served")


async def test_sigterm_drains_requests_in_flight(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    process = start_worker_process(nats_server.url, "slow")
    try:
        await wait_until_served(client, "slow")
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        # slow takes 0.2 s a batch of at most 8 on one instance: 16 requests take 2 batches
        # at least, so when the first answer comes the rest are still queued or computing.
        calls = [asyncio.create_task(client.infer("slow", {"x": x + i})) for i in range(16)]
        await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        process.send_signal(signal.SIGTERM)
        in_flight = sum(not call.done() for call in calls)
        results = await asyncio.gather(*calls)
        exit_code = await asyncio.to_thread(process.wait, 20)
    finally:
        process.kill()
        output = process.communicate()[0].decode()
    assert in_flight > 0, "nothing was left to drain"
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], x + i)
        assert result.attempts == 1  # answered by the draining worker, not retried
    assert exit_code == 0, output
    assert "draining" in output
    with pytest.raises(inferbus.ModelNotFound):
        await client.infer("slow", {"x": x})


def test_discovery_skips_endpoints_it_cannot_read() -> None:
    from inferbus.pipeline.discovery import models_from_infos

    spec = {"name": "x", "datatype": "FP32", "shape": [-1]}
    signature = orjson.dumps({"inputs": [spec], "outputs": [{**spec, "name": "y"}]}).decode()
    good = {
        "model": "m", "version": "1", "engine": "onnxruntime", "device": "cpu",
        "max_batch_size": "4", "signature": signature,
    }  # fmt: skip
    odd = [
        {**good, "version": "two"},
        {**good, "signature": "{not json"},
        {**good, "signature": good["signature"].replace("FP32", "BF16")},
        {"unrelated": "service"},
    ]
    infos = [{"id": "W", "endpoints": [{"metadata": meta} for meta in [good, *odd]]}]
    (model,) = models_from_infos(infos)
    assert (model.name, model.version, model.max_batch_size) == ("m", 1, 4)
