"""Engines that misbehave: every caller still gets a coded answer, and the worker still stops."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

import inferbus
from inferbus.engines import OnnxRuntimeEngine, Tensors
from tests.conftest import TEST_MODELS, worker_options


class NotAMappingEngine(OnnxRuntimeEngine):
    """Returns a list instead of named outputs: a bug in a user's engine."""

    def infer(self, batch: Tensors) -> Tensors:
        return ["not", "named", "outputs"]  # type: ignore[return-value]


class WrongRowsEngine(OnnxRuntimeEngine):
    """Returns one row whatever the batch: batches cannot be split back."""

    def infer(self, batch: Tensors) -> Tensors:
        return {"y": np.zeros((1, 4), dtype=np.float32)}


def config(engine: type[OnnxRuntimeEngine], delay_ms: float) -> inferbus.ModelConfig:
    base = inferbus.load_model_config(TEST_MODELS / "add_v1")
    return dataclasses.replace(
        base,
        name="broken",
        engine_class=f"{__name__}:{engine.__name__}",
        max_queue_delay_ms=delay_ms,
    )


@pytest.mark.parametrize("delay_ms", [0, 30], ids=["direct", "batched"])
async def test_a_broken_engine_gets_500s_and_the_worker_stops(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client, delay_ms: float
) -> None:
    worker = inferbus.Worker([config(NotAMappingEngine, delay_ms)], worker_options(nats_server))
    async with worker:
        x = {"x": np.ones((1, 4), dtype=np.float32)}
        outcomes = await asyncio.gather(
            *(client.infer("broken", x, timeout=5) for _ in range(3)), return_exceptions=True
        )
    for outcome in outcomes:
        assert isinstance(outcome, inferbus.EngineFailure), outcome
        assert "internal error" in str(outcome)


async def test_outputs_that_cannot_be_split_are_retried_one_by_one(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    worker = inferbus.Worker([config(WrongRowsEngine, 30)], worker_options(nats_server))
    async with worker:
        x = {"x": np.ones((1, 4), dtype=np.float32)}
        results = await asyncio.gather(*(client.infer("broken", x) for _ in range(4)))
        (model,) = worker.models
        data = model.stats_data()
    assert all(r["y"].shape == (1, 4) for r in results)
    assert data["inference_count"] == 4  # each counted once, after its retry alone
    assert data["execution_count"] >= 4
