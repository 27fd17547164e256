"""Workers that serve from the model store: deploy → served, undeploy → drained, rollouts
under load, LRU unloading and load on demand, sha256 checks, restarts. Real nats-server with
JetStream; the archives are made from tests/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

import inferbus
from inferbus.store.archive import pack
from inferbus.store.client import Store
from inferbus.store.reconcile import StoreSettings
from inferbus.store.records import FILES_BUCKET, Deployment
from tests.conftest import TEST_MODELS

X = np.ones((2, 4), np.float32)


@pytest.fixture
def jetstream(tmp_path: Path) -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js") as server:
        yield server


@pytest.fixture
async def store(jetstream: inferbus.EmbeddedServer) -> AsyncIterator[Store]:
    async with inferbus.connect(jetstream.url) as client:
        yield await Store.open(client.nats)


def settings(tmp_path: Path, **changes: object) -> StoreSettings:
    return StoreSettings(cache_dir=tmp_path / "cache", device="cpu", **changes)  # type: ignore[arg-type]


def store_worker(server: inferbus.EmbeddedServer, tmp_path: Path, **changes: object
                 ) -> inferbus.Worker:  # fmt: skip
    options = inferbus.ConnectOptions(servers=[server.url], name="store-worker")
    return inferbus.Worker([], options, store=settings(tmp_path, **changes))


async def deploy(store: Store, folder: Path, model: str, version: int, tmp: Path,
                 **fields: object) -> Deployment:  # fmt: skip
    archive = await asyncio.to_thread(pack, folder, tmp / f"{model}-{version}.tar")
    await store.upload(archive)
    deployment = Deployment(model, version, archive.sha256, archive.size, **fields)  # type: ignore[arg-type]
    await store.put(deployment)
    return deployment


async def served(client: inferbus.Client, model: str, version: int) -> bool:
    return any(m.name == model and m.version == version for m in await client.models(timeout=0.2))


async def until_served(client: inferbus.Client, model: str, version: int, *, wanted: bool) -> None:
    """Wait (each look gathers discovery answers for 0.2 s) until the version is, or is no
    longer, served."""
    for _ in range(150):
        if await served(client, model, version) == wanted:
            return
    raise AssertionError(f"{model} v{version} {'never' if wanted else 'still'} served")


async def test_a_deployed_model_is_served_and_undeploying_drains_it(
    jetstream: inferbus.EmbeddedServer, store: Store, tmp_path: Path
) -> None:
    async with store_worker(jetstream, tmp_path), inferbus.connect(jetstream.url) as client:
        started = time.monotonic()
        await deploy(store, TEST_MODELS / "add_v1", "add", 1, tmp_path)
        result = await client.infer("add", {"x": X}, timeout=30)
        first_answer = time.monotonic() - started
        np.testing.assert_array_equal(result["y"], X + 1)
        print(f"time to first answer after deploy: {first_answer:.2f} s")
        in_flight = [asyncio.create_task(client.infer("add", {"x": X})) for _ in range(50)]
        await asyncio.sleep(0)  # sent before the unload begins
        await store.delete("add", 1)
        answers = await asyncio.gather(*in_flight, return_exceptions=True)
        # Nothing delivered is lost: a request is answered by the model, or (sent after the
        # model left) told it is not deployed; none times out.
        assert all(not isinstance(a, BaseException) for a in answers[:10])
        assert all(
            isinstance(a, inferbus.ModelNotFound) for a in answers if isinstance(a, BaseException)
        )
        await until_served(client, "add", 1, wanted=False)
        with pytest.raises(inferbus.ModelNotFound, match="not deployed"):
            await client.infer("add", {"x": X}, timeout=5)


async def test_a_rollout_under_load_loses_nothing(
    jetstream: inferbus.EmbeddedServer, store: Store, tmp_path: Path
) -> None:
    async with store_worker(jetstream, tmp_path), inferbus.connect(jetstream.url) as client:
        await deploy(store, TEST_MODELS / "add_v1", "add", 1, tmp_path)
        await client.infer("add", {"x": X}, timeout=30)
        seen: list[float] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()
        enough = asyncio.Event()
        wanted = [0]  # how many answers make enough

        async def load() -> None:
            while not stop.is_set():
                try:
                    seen.append(float((await client.infer("add", {"x": X}))["y"][0, 0]))
                except inferbus.RequestError as exc:
                    errors.append(exc)
                if wanted[0] and len(seen) >= wanted[0]:
                    enough.set()

        callers = [asyncio.create_task(load()) for _ in range(8)]
        await deploy(store, TEST_MODELS / "add_v2", "add", 2, tmp_path)
        await until_served(client, "add", 2, wanted=True)
        await store.delete("add", 1)  # what `inferbus deploy --replace` does once v2 serves
        await until_served(client, "add", 1, wanted=False)
        after = len(seen)
        wanted[0] = after + 50
        await enough.wait()
        stop.set()
        await asyncio.gather(*callers)
    assert errors == []
    assert set(seen) == {2.0, 3.0}  # v1 answered x + 1, v2 x + 2
    assert set(seen[after + 10 :]) == {3.0}  # once v1 is gone, only v2 answers


async def test_lru_unloading_and_load_on_demand(
    jetstream: inferbus.EmbeddedServer, store: Store, tmp_path: Path
) -> None:
    folders = {"m1": "add_v1", "m2": "add_v1", "m3": "add_v1"}
    async with (
        store_worker(jetstream, tmp_path, max_models=2) as worker,
        inferbus.connect(jetstream.url) as client,
    ):
        for name, folder in folders.items():
            await deploy(store, TEST_MODELS / folder, name, 1, tmp_path)
        await client.infer("m1", {"x": X}, timeout=30)
        await client.infer("m2", {"x": X}, timeout=30)
        assert {m.config.name for m in worker.models} == {"m1", "m2"}
        await client.infer("m2", {"x": X})  # m1 is now the least recently used
        await asyncio.sleep(1.2)  # usage is sampled each second: let the sample see m2 last
        result = await client.infer("m3", {"x": X}, timeout=30)  # loaded on demand
        np.testing.assert_array_equal(result["y"], X + 1)
        assert {m.config.name for m in worker.models} == {"m2", "m3"}
        await client.infer("m1", {"x": X}, timeout=30)  # and m1 comes back, m2 goes
        assert len(worker.models) == 2


async def test_a_sha256_mismatch_is_refused(
    jetstream: inferbus.EmbeddedServer, store: Store, tmp_path: Path
) -> None:
    """An archive whose bytes do not hash to the name the deployment gives is never unpacked."""
    deployed = await deploy(store, TEST_MODELS / "add_v1", "add", 1, tmp_path)
    other = await asyncio.to_thread(pack, TEST_MODELS / "add_v2", tmp_path / "other.tar")
    async with inferbus.connect(jetstream.url) as tamperer:
        files = await tamperer.nats.jetstream().object_store(FILES_BUCKET)
        await files.put(deployed.sha256, other.path.read_bytes())
    async with store_worker(jetstream, tmp_path), inferbus.connect(jetstream.url) as client:
        with pytest.raises(inferbus.Unavailable, match="sha256"):
            await client.infer("add", {"x": X}, timeout=10)
    assert not (tmp_path / "cache" / deployed.sha256).exists()


async def test_a_restarted_worker_gets_its_models_back(
    jetstream: inferbus.EmbeddedServer, store: Store, tmp_path: Path
) -> None:
    await deploy(store, TEST_MODELS / "add_v2", "add", 2, tmp_path)
    for attempt in range(2):
        async with (
            store_worker(jetstream, tmp_path / f"run{attempt}") as worker,
            inferbus.connect(jetstream.url) as client,
        ):
            result = await client.infer("add", {"x": X}, timeout=30)
            np.testing.assert_array_equal(result["y"], X + 2)
            room = orjson.loads(worker.service.info()["metadata"]["store"])
            assert room == {"max_models": 4, "memory_mb": None, "device": "cpu"}
