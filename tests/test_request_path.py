"""The worker's request path: a request computed at once (direct) and one that waits for a
batch (queued) go through the same executor, so health, expiry and the one-by-one fallback
behave the same on both."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

import inferbus
from tests.conftest import TEST_MODELS

FAILURES = 3


def failing_config(*, direct: bool) -> inferbus.ModelConfig:
    """The failing test model, inline with no queue delay (direct path) or queued."""
    base = inferbus.load_model_config(TEST_MODELS / "failing")
    if direct:
        return dataclasses.replace(
            base, execution="inline", max_queue_delay_ms=0, max_failures=FAILURES
        )
    return dataclasses.replace(base, execution="thread", max_failures=FAILURES)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "queued"])
async def test_engine_failures_count_toward_health_on_every_path(
    nats_server: inferbus.EmbeddedServer, direct: bool
) -> None:
    options = inferbus.ConnectOptions(servers=[nats_server.url], name="test-worker")
    async with (
        inferbus.Worker([failing_config(direct=direct)], options) as worker,
        inferbus.connect(nats_server.url) as client,
    ):
        model = worker.models[0]
        bad = {"x": -np.ones((1, 4), dtype=np.float32)}
        for _ in range(FAILURES):
            with pytest.raises(inferbus.EngineFailure, match="engine exploded"):
                await client.infer("failing", bad, timeout=5)
        assert model.health.failures_in_a_row == FAILURES
        assert model.stats_data()["errors_by_code"] == {"500": FAILURES}
        # The watchdog takes the engine out of rotation (it checks every 0.2 s).
        for _ in range(100):
            if not worker.ready:
                break
            await asyncio.sleep(0.05)
        assert not worker.ready
        assert model.stats_data()["health"] == f"unhealthy: {FAILURES} engine failures in a row"


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "queued"])
async def test_a_success_resets_the_failure_count_on_every_path(
    nats_server: inferbus.EmbeddedServer, direct: bool
) -> None:
    options = inferbus.ConnectOptions(servers=[nats_server.url], name="test-worker")
    async with (
        inferbus.Worker([failing_config(direct=direct)], options) as worker,
        inferbus.connect(nats_server.url) as client,
    ):
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
