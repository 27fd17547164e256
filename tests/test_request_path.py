"""The worker's request path: a request computed at once (direct) and one that waits for a
batch (queued) go through the same executor, so health, expiry and the one-by-one fallback
behave the same on both."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import ClassVar

import numpy as np
import pytest

import inferbus
from inferbus.engines import OnnxRuntimeEngine, Tensors
from tests.conftest import TEST_MODELS, eventually

FAILURES = 3


class Breakable(OnnxRuntimeEngine):
    """Fails every call, warm-up inputs included, once ``broken`` is set: a GPU gone bad."""

    broken: ClassVar[bool] = False

    def infer(self, batch: Tensors) -> Tensors:
        if Breakable.broken:
            raise RuntimeError("device lost")
        return super().infer(batch)


def failing_config(*, direct: bool, engine_class: str | None = None) -> inferbus.ModelConfig:
    """The failing test model, inline with no queue delay (direct path) or queued."""
    base = inferbus.load_model_config(TEST_MODELS / "failing")
    if engine_class is not None:
        base = dataclasses.replace(base, engine_class=engine_class)
    if direct:
        return dataclasses.replace(
            base, execution="inline", max_queue_delay_ms=0, max_failures=FAILURES
        )
    return dataclasses.replace(base, execution="thread", max_failures=FAILURES)


@contextlib.asynccontextmanager
async def serving(
    server: inferbus.EmbeddedServer, config: inferbus.ModelConfig
) -> AsyncIterator[tuple[inferbus.Worker, inferbus.Client]]:
    """A worker of this test's own serving ``config``, and a client."""
    options = inferbus.ConnectOptions(servers=[server.url], name="test-worker")
    async with inferbus.Worker([config], options) as worker, inferbus.connect(server.url) as client:
        yield worker, client


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "queued"])
async def test_engine_failures_count_toward_health_on_every_path(
    nats_server: inferbus.EmbeddedServer, direct: bool
) -> None:
    config = failing_config(direct=direct, engine_class=f"{__name__}:Breakable")
    Breakable.broken = False
    async with serving(nats_server, config) as (worker, client):
        model = worker.models[0]
        Breakable.broken = True  # after the warm-up at load: now every call fails
        x = {"x": np.ones((1, 4), dtype=np.float32)}
        for _ in range(FAILURES):
            with pytest.raises(inferbus.EngineFailure, match="device lost"):
                await client.infer("failing", x, timeout=5)
        assert model.health.failures_in_a_row == FAILURES
        assert model.stats_data()["errors_by_code"] == {"500": FAILURES}
        # The watchdog (every 0.2 s) probes the engine, which fails too: out of rotation.
        try:
            await eventually(lambda: not worker.ready, "the engine left the rotation")
        finally:
            Breakable.broken = False
        assert model.stats_data()["health"] == f"unhealthy: {FAILURES} engine failures in a row"


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "queued"])
async def test_failures_caused_by_inputs_never_take_the_engine_out(
    nats_server: inferbus.EmbeddedServer, direct: bool
) -> None:
    """The failing model raises on negative inputs only: its probe passes, inputs are blamed."""
    async with serving(nats_server, failing_config(direct=direct)) as (worker, client):
        health = worker.models[0].health
        bad = {"x": -np.ones((1, 4), dtype=np.float32)}
        for _ in range(2 * FAILURES):
            with pytest.raises(inferbus.EngineFailure, match="engine exploded"):
                await client.infer("failing", bad, timeout=5)
        assert worker.models[0].stats_data()["errors_by_code"] == {"500": 2 * FAILURES}
        # The watchdog probes (every 0.2 s); the probe passes, so the count starts again.
        await eventually(lambda: health.failures_in_a_row == 0, "the inputs were blamed")
        assert worker.ready
        good = {"x": np.ones((1, 4), dtype=np.float32)}
        np.testing.assert_array_equal((await client.infer("failing", good)).output, good["x"])


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "queued"])
async def test_a_success_resets_the_failure_count_on_every_path(
    nats_server: inferbus.EmbeddedServer, direct: bool
) -> None:
    async with serving(nats_server, failing_config(direct=direct)) as (worker, client):
        bad = {"x": -np.ones((1, 4), dtype=np.float32)}
        good = {"x": np.ones((1, 4), dtype=np.float32)}
        for _ in range(FAILURES - 1):
            with pytest.raises(inferbus.EngineFailure):
                await client.infer("failing", bad, timeout=5)
        assert worker.models[0].health.failures_in_a_row == FAILURES - 1
        result = await client.infer("failing", good, timeout=5)
        np.testing.assert_array_equal(result.output, good["x"])
        assert worker.models[0].health.failures_in_a_row == 0
        assert worker.ready
