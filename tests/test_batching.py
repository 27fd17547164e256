"""Dynamic batching: each caller gets its own rows, full queues refuse, budgets are honoured."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
from nats.aio.client import Client as NatsClient

import inferbus
from inferbus.codecs import InferRequest, encode_request
from inferbus.pipeline.batching import BatchQueue


def stats_of(worker: inferbus.Worker, endpoint: str) -> dict[str, object]:
    record = next(e for e in worker.service.endpoints if e.name == endpoint)
    assert record.data is not None
    return record.data()


async def test_queue_batches_compatible_requests_up_to_the_limit() -> None:
    queue: BatchQueue[str] = BatchQueue(max_batch_size=4, max_queue_delay_s=0.01)
    for name, rows, key in [("a", 1, "k"), ("b", 2, "other"), ("c", 2, "k"), ("d", 2, "k")]:
        queue.submit(name, rows=rows, key=key)
    first = [p.payload for p in await queue.next_batch()]
    second = [p.payload for p in await queue.next_batch()]
    third = [p.payload for p in await queue.next_batch()]
    assert first == ["a", "c"]  # d would make 5 rows; b has other trailing shapes
    assert second == ["b"]
    assert third == ["d"]


async def test_queue_waits_for_the_delay_then_sends_what_it_has() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch_size=8, max_queue_delay_s=0.05)
    queue.submit(1, rows=1, key=0)
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, lambda: queue.submit(2, rows=1, key=0))
    batch = await queue.next_batch()
    assert [p.payload for p in batch] == [1, 2]


async def test_preferred_batch_size_dispatches_early() -> None:
    queue: BatchQueue[int] = BatchQueue(
        max_batch_size=8, max_queue_delay_s=60, preferred_batch_sizes=(2,)
    )
    queue.submit(1, rows=1, key=0)
    queue.submit(2, rows=1, key=0)
    batch = await asyncio.wait_for(queue.next_batch(), 5)  # not the 60 s delay
    assert len(batch) == 2


async def test_full_queue_refuses() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch_size=1, max_queue_size=2)
    queue.submit(1, rows=1, key=0)
    queue.submit(2, rows=1, key=0)
    with pytest.raises(inferbus.Overloaded) as caught:
        queue.submit(3, rows=1, key=0)
    assert caught.value.code == 429


async def test_each_caller_gets_its_own_rows_back(
    worker: inferbus.Worker, client: inferbus.Client
) -> None:
    # slow takes 0.2 s a batch, so concurrent callers pile up and share batches.
    sizes = [1, 3, 2, 1, 2, 3, 1, 1, 2, 3]
    inputs = [
        (np.full((n, 4), i) + np.arange(n)[:, None]).astype(np.float32) for i, n in enumerate(sizes)
    ]
    results = await asyncio.gather(*(client.infer("slow", {"x": x}) for x in inputs))
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result["y"], x)
    data = stats_of(worker, "slow")
    assert data["inference_count"] == len(sizes)
    assert isinstance(data["execution_count"], int)
    assert data["execution_count"] < len(sizes), "no request shared a batch"
    assert data["mean_batch_size"] == pytest.approx(sum(sizes) / data["execution_count"])


async def test_queue_full_is_a_429(
    worker: inferbus.Worker, nats_server: inferbus.EmbeddedServer
) -> None:
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    once = inferbus.RetryPolicy(max_attempts=1)  # see the worker's answer, not a retry
    async with inferbus.connect(nats_server.url, retry=once) as client:
        outcomes = await asyncio.gather(
            *(client.infer("slow", x) for _ in range(40)), return_exceptions=True
        )
    refused = [o for o in outcomes if isinstance(o, inferbus.Overloaded)]
    served = [o for o in outcomes if isinstance(o, inferbus.InferResult)]
    assert refused, "a queue of 16 took 40 requests"
    assert len(refused) + len(served) == 40
    assert len(served) >= 16
    assert "queue full" in str(refused[0])
    assert stats_of(worker, "slow")["errors_by_code"] == {"429": len(refused)}


async def test_expired_budget_is_a_504_and_the_engine_never_runs(
    worker: inferbus.Worker, client: inferbus.Client, raw_nats: NatsClient
) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    busy = asyncio.create_task(client.infer("slow", {"x": x}))  # holds the engine for 0.2 s
    await asyncio.sleep(0.05)
    short = encode_request(InferRequest("short", {"x": x}, timeout_us=20_000))
    reply = await raw_nats.request("inferbus.infer.slow", short, timeout=5)
    await busy
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "504"
    assert "engine was skipped" in reply.headers["Nats-Service-Error"]
    data = stats_of(worker, "slow")
    assert data["inference_count"] == 1  # only the busy request was computed
    assert data["errors_by_code"] == {"504": 1}


@pytest.mark.usefixtures("worker")
async def test_a_failing_request_does_not_fail_its_batch_mates(
    client: inferbus.Client, worker: inferbus.Worker
) -> None:
    # failing waits 20 ms to fill a batch, and raises on any negative input.
    values = [1.0, 2.0, -1.0, 3.0, 4.0]
    outcomes = await asyncio.gather(
        *(client.infer("failing", {"x": np.full((1, 4), v, dtype=np.float32)}) for v in values),
        return_exceptions=True,
    )
    for value, outcome in zip(values, outcomes, strict=True):
        if value < 0:
            assert isinstance(outcome, inferbus.EngineFailure)
        else:
            assert isinstance(outcome, inferbus.InferResult), outcome
            np.testing.assert_array_equal(outcome["y"], np.full((1, 4), value))
    data = stats_of(worker, "failing")
    assert data["inference_count"] == 4
    assert data["errors_by_code"] == {"500": 1}


@pytest.mark.usefixtures("worker")
async def test_stats_report_queue_and_compute_time(
    client: inferbus.Client, raw_nats: NatsClient
) -> None:
    await client.infer("slow", {"x": np.zeros((2, 4), dtype=np.float32)})
    stats = orjson.loads((await raw_nats.request("$SRV.STATS.inferbus", b"", timeout=2)).data)
    data = {e["name"]: e["data"] for e in stats["endpoints"]}["slow"]
    assert data["compute_ms"]["p50"] >= 150  # the engine sleeps 200 ms
    assert data["compute_ns"] >= 150e6
    assert data["request_count"] == data["success_count"] == 1
    assert data["pending"] == 0
    assert set(data["queue_ms"]) == {"p50", "p90", "p99"}
