"""A worker whose engine hangs leaves the rotation; traffic moves to the healthy worker."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading

import numpy as np

import inferbus
from inferbus.engines import OnnxRuntimeEngine, Tensors
from tests.conftest import TEST_MODELS, eventually, worker_options

_instances = itertools.count()
_release = threading.Event()


class FirstOneHangs(OnnxRuntimeEngine):
    """The first instance made (in this process) hangs in every call until the test releases
    it: a hung GPU, say."""

    def load(self) -> None:
        super().load()
        self.hangs = next(_instances) == 0

    def infer(self, batch: Tensors) -> Tensors:
        if self.hangs and batch["x"].sum() != 0:  # warm-up (zeros) passes, requests hang
            _release.wait(30)
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


def successes(worker: inferbus.Worker) -> int:
    return int(worker.models[0].stats_data()["success_count"])


async def test_a_hung_engine_leaves_the_rotation(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    global _instances
    _instances = itertools.count()
    _release.clear()
    stuck = inferbus.Worker([hang_config()], worker_options(nats_server))
    healthy = inferbus.Worker([hang_config()], worker_options(nats_server))
    x = {"x": np.ones((1, 4), dtype=np.float32)}
    async with stuck, healthy:
        try:
            calls = [asyncio.create_task(client.infer("hang", x, timeout=20)) for _ in range(20)]
            # The stuck engine leaves the rotation while it hangs...
            await eventually(lambda: not stuck.ready, "the hung worker left the rotation")
            assert stuck.models[0].stats_data()["health"].startswith("unhealthy: engine call")
            assert healthy.ready
            # ...so requests sent now are answered while it still hangs: by the healthy one.
            served_before = successes(healthy)
            more = await asyncio.gather(*(client.infer("hang", x, timeout=20) for _ in range(10)))
            assert successes(healthy) - served_before >= 10
        finally:
            _release.set()  # the hung call returns
        results = await asyncio.gather(*calls)
        assert all(np.array_equal(r["y"], np.full((1, 4), 2.0)) for r in [*results, *more])
        # Once the hung call has returned, the worker takes requests again.
        await eventually(lambda: stuck.ready, "the worker came back")
        assert stuck.models[0].stats_data()["health"] == "ready"
