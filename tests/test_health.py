"""A worker whose engine hangs leaves the rotation; traffic moves to the healthy worker."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

import numpy as np

import inferbus
from inferbus.engines import OnnxRuntimeEngine, Tensors
from tests.conftest import TEST_MODELS, worker_options

_instances = itertools.count()


class FirstOneHangs(OnnxRuntimeEngine):
    """The first instance made (in this process) takes 1.5 s per call: a hung GPU, say."""

    def load(self) -> None:
        super().load()
        self.hangs = next(_instances) == 0

    def infer(self, batch: Tensors) -> Tensors:
        if self.hangs and batch["x"].sum() != 0:  # warm-up (zeros) passes, requests hang
            time.sleep(1.5)
        return super().infer(batch)


def hang_config() -> inferbus.ModelConfig:
    base = inferbus.load_model_config(TEST_MODELS / "add_v1")
    return dataclasses.replace(
        base,
        name="hang",
        engine_class=f"{__name__}:FirstOneHangs",
        execution="thread",
        hang_after_s=0.3,
    )


async def test_a_hung_engine_leaves_the_rotation(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    global _instances
    _instances = itertools.count()
    stuck = inferbus.Worker([hang_config()], worker_options(nats_server))
    healthy = inferbus.Worker([hang_config()], worker_options(nats_server))
    async with stuck, healthy:
        x = {"x": np.ones((1, 4), dtype=np.float32)}
        started = time.monotonic()
        results = await asyncio.gather(*(client.infer("hang", x, timeout=4) for _ in range(20)))
        elapsed = time.monotonic() - started
        assert all(np.array_equal(r["y"], np.full((1, 4), 2.0)) for r in results)
        assert elapsed < 4
        assert not stuck.ready
        assert stuck.models[0].stats_data()["health"].startswith("unhealthy: engine call")
        assert healthy.ready
        # Once the hung call returns, the worker takes requests again.
        for _ in range(50):
            await asyncio.sleep(0.1)
            if stuck.ready:
                break
        assert stuck.ready
        assert stuck.models[0].stats_data()["health"] == "ready"
