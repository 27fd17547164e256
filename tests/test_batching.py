"""Dynamic batching: each caller gets its own rows, full queues refuse, budgets are honoured."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import inferbus
from inferbus.codecs import InferRequest, encode_request
from inferbus.engines import Tensors
from inferbus.pipeline.batching import BatchQueue
from tests.conftest import eventually


def stats_of(worker: inferbus.Worker, endpoint: str) -> dict[str, object]:
    record = next(e for e in worker.service.endpoints if e.name == endpoint)
    assert record.data is not None
    return record.data(None)


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
    queue: BatchQueue[int] = BatchQueue(max_batch_size=8, max_queue_delay_s=0.25)
    queue.submit(1, rows=1, key=0)
    batch = asyncio.create_task(queue.next_batch())
    await asyncio.sleep(0)  # one step: next_batch has 1 request and waits for more
    assert not batch.done()
    queue.submit(2, rows=1, key=0)  # arrives while it waits: it joins the batch
    assert [p.payload for p in await batch] == [1, 2]  # 2 of 8 rows: sent once the delay ran out
    assert len(queue) == 0


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


class HeldEngine:
    """A served model whose engine, once called, computes nothing until ``release()``: while
    it is held, requests queue up behind the batch it took, for as long as the test needs."""

    def __init__(self, worker: inferbus.Worker, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        (self.model,) = [m for m in worker.models if m.config.name == name]
        (engine,) = self.model.executor.engines
        self._gate = threading.Event()
        infer = engine.infer

        def held(batch: Tensors) -> Tensors:
            self._gate.wait(30)
            return infer(batch)

        monkeypatch.setattr(engine, "infer", held)

    async def busy(self) -> None:
        """Until the engine has taken a batch (and is held)."""
        await eventually(lambda: self.model.health.busy_since is not None, "the engine is busy")

    async def queued(self, count: int) -> None:
        """Until ``count`` requests wait in the model's queue."""
        await eventually(lambda: self.model.stats_data()["pending"] == count, f"{count} queued")

    def release(self) -> None:
        self._gate.set()


async def test_each_caller_gets_its_own_rows_back(
    own_worker: inferbus.Worker, client: inferbus.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The callers after the first queue up behind it, and share batches of up to 8 rows.
    sizes = [1, 3, 2, 1, 2, 3, 1, 1, 2, 3]
    inputs = [
        (np.full((n, 4), i) + np.arange(n)[:, None]).astype(np.float32) for i, n in enumerate(sizes)
    ]
    engine = HeldEngine(own_worker, "slow", monkeypatch)
    try:
        first = asyncio.create_task(client.infer("slow", {"x": inputs[0]}))
        await engine.busy()
        rest = [asyncio.create_task(client.infer("slow", {"x": x})) for x in inputs[1:]]
        await engine.queued(len(rest))
    finally:
        engine.release()
    results = await asyncio.gather(first, *rest)
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result["y"], x)
    data = stats_of(own_worker, "slow")
    assert data["inference_count"] == len(sizes)
    assert isinstance(data["execution_count"], int)
    assert data["execution_count"] < len(sizes), "no request shared a batch"
    assert data["mean_batch_size"] == pytest.approx(sum(sizes) / data["execution_count"])


async def test_queue_full_is_a_429(
    own_worker: inferbus.Worker, raw_nats: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over raw NATS, to see the worker's own answers (a client retries a 429 for its budget).
    body = encode_request(InferRequest("q", {"x": np.zeros((1, 4), dtype=np.float32)}))

    def send() -> asyncio.Task[Msg]:
        return asyncio.create_task(raw_nats.request("inferbus.infer.slow", body, timeout=30))

    engine = HeldEngine(own_worker, "slow", monkeypatch)
    try:
        computing = send()
        await engine.busy()
        queued = [send() for _ in range(16)]  # slow's max_queue_size
        await engine.queued(16)
        refused = await send()
    finally:
        engine.release()
    assert refused.headers is not None
    assert refused.headers["Nats-Service-Error-Code"] == "429"
    assert "queue full" in refused.headers["Nats-Service-Error"]
    served = await asyncio.gather(computing, *queued)
    assert all(not reply.headers for reply in served)
    assert stats_of(own_worker, "slow")["errors_by_code"] == {"429": 1}


async def test_expired_budget_is_a_504_and_the_engine_never_runs(
    own_worker: inferbus.Worker,
    client: inferbus.Client,
    raw_nats: NatsClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    engine = HeldEngine(own_worker, "slow", monkeypatch)
    try:
        busy = asyncio.create_task(client.infer("slow", {"x": x}))
        await engine.busy()
        short = encode_request(InferRequest("short", {"x": x}, timeout_us=20_000))
        sent = time.monotonic()
        reply = asyncio.create_task(raw_nats.request("inferbus.infer.slow", short, timeout=5))
        await engine.queued(1)
        # Hold the engine until the short request's 20 ms budget has certainly run out.
        await eventually(lambda: time.monotonic() > sent + 0.02, "20 ms passed")
    finally:
        engine.release()
    await busy
    answer = await reply
    assert answer.headers is not None
    assert answer.headers["Nats-Service-Error-Code"] == "504"
    assert "engine was skipped" in answer.headers["Nats-Service-Error"]
    data = stats_of(own_worker, "slow")
    assert data["inference_count"] == 1  # only the busy request was computed
    assert data["errors_by_code"] == {"504": 1}


async def test_a_failing_request_does_not_fail_its_batch_mates(
    client: inferbus.Client, own_worker: inferbus.Worker
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
    data = stats_of(own_worker, "failing")
    assert data["inference_count"] == 4
    assert data["errors_by_code"] == {"500": 1}


@pytest.mark.usefixtures("own_worker")
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
