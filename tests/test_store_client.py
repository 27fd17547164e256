"""The model store's JetStream operations on a real nats-server with JetStream: archives up and
down (checked against their sha256), deployments put, listed, watched and deleted."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

import inferbus
from inferbus.errors import ConfigError, ModelNotFound, Unavailable
from inferbus.store.archive import Archive, pack
from inferbus.store.client import Store
from inferbus.store.records import DEPLOYMENTS_BUCKET, FILES_BUCKET, Deployment
from tests.conftest import TEST_MODELS


@pytest.fixture
def jetstream(tmp_path: Path) -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js") as server:
        yield server


@pytest.fixture
async def nc(jetstream: inferbus.EmbeddedServer) -> AsyncIterator[NatsClient]:
    client = await nats.connect(jetstream.url)
    yield client
    await client.close()


@pytest.fixture
async def store(nc: NatsClient) -> Store:
    return await Store.open(nc)


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return pack(TEST_MODELS / "add_v1", tmp_path / "add.tar")


def deployment(archive: Archive, model: str = "add", version: int = 1) -> Deployment:
    return Deployment(model, version, archive.sha256, archive.size)


async def test_an_archive_goes_up_once_and_comes_down_checked(
    store: Store, archive: Archive, tmp_path: Path
) -> None:
    sent: list[int] = []
    assert await store.upload(archive, progress=sent.append)
    assert sum(sent) == archive.size
    assert await store.has(archive.sha256)
    assert not await store.upload(archive)  # the store holds it: nothing is sent again
    got = await store.download(archive.sha256, tmp_path / "down.tar", size=archive.size)
    assert got.read_bytes() == archive.path.read_bytes()


async def test_a_large_archive_streams_in_chunks(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(bytes(range(256)) * (12 * 1024))  # 3 MiB
    big = pack(folder, tmp_path / "big.tar")
    sent: list[int] = []
    await store.upload(big, progress=sent.append)
    assert len(sent) > 1
    assert sum(sent) == big.size
    got = await store.download(big.sha256, tmp_path / "down.tar")
    assert got.read_bytes() == big.path.read_bytes()


async def test_a_tampered_object_is_refused_and_leaves_no_file(
    store: Store, nc: NatsClient, archive: Archive, tmp_path: Path
) -> None:
    files = await nc.jetstream().object_store(FILES_BUCKET)
    await files.put(archive.sha256, b"other bytes under the archive's name")
    assert not await store.has(archive.sha256)
    down = tmp_path / "down.tar"
    with pytest.raises(ConfigError, match=r"hash to sha256 .*not to its name: refused"):
        await store.download(archive.sha256, down)
    assert not down.exists()
    with pytest.raises(ConfigError, match="the store holds 36 bytes, the deployment says"):
        await store.download(archive.sha256, down, size=archive.size)
    assert not down.exists()
    assert await store.upload(archive)  # a good upload replaces the bad object
    assert (await store.download(archive.sha256, down)).read_bytes() == archive.path.read_bytes()


async def test_chunks_that_do_not_match_the_objects_digest_are_refused(
    store: Store, nc: NatsClient, archive: Archive, tmp_path: Path
) -> None:
    await store.upload(archive)
    files = await nc.jetstream().object_store(FILES_BUCKET)
    info = await files.get_info(archive.sha256)
    info.digest = "SHA-256=" + base64.urlsafe_b64encode(b"\0" * 32).decode()
    meta = f"$O.{FILES_BUCKET}.M.{base64.urlsafe_b64encode(archive.sha256.encode()).decode()}"
    await nc.jetstream().publish(meta, json.dumps(info.as_dict()).encode(),
                                 headers={"Nats-Rollup": "sub"})  # fmt: skip
    down = tmp_path / "down.tar"
    with pytest.raises(ConfigError, match="do not match its sha256 digest"):
        await store.download(archive.sha256, down)
    assert not down.exists()


async def test_unknown_and_malformed_archive_names(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="holds no archive"):
        await store.download("0" * 64, tmp_path / "x.tar")
    with pytest.raises(ConfigError, match="not a sha256"):
        await store.download("../../etc/passwd", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


async def test_deployments_are_put_listed_and_deleted(store: Store, archive: Archive) -> None:
    assert await store.deployments() == []
    put = [deployment(archive, model, version) for model, version in
           (("add", 2), ("add", 1), ("echo", 1))]  # fmt: skip
    for one in put:
        assert await store.put(one) >= 1
    assert await store.deployments() == [put[1], put[0], put[2]]  # by model, then version
    assert await store.get("add", 2) == put[0]
    assert await store.get("add", 3) is None
    assert await store.delete("add", 3) == []
    assert await store.delete("add", 1) == ["add.1"]
    assert await store.delete("add") == ["add.2"]
    assert [d.key for d in await store.deployments()] == ["echo.1"]
    with pytest.raises(ConfigError, match="model name"):
        await store.delete("no.dots")


async def test_malformed_records_are_skipped_and_reported(
    store: Store, nc: NatsClient, archive: Archive
) -> None:
    await store.put(deployment(archive))
    kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
    await kv.put("bad.1", b"{not json")
    await kv.put("add.7", deployment(archive, "add", 8).to_json())  # about another key
    await kv.put("neg.1", json.dumps({**json.loads(deployment(archive).to_json()),
                                      "model": "neg", "version": -1}).encode())  # fmt: skip
    reported: list[str] = []
    found = await store.deployments(on_malformed=lambda key, error: reported.append(key))
    assert [d.key for d in found] == ["add.1"]
    assert sorted(reported) == ["add.7", "bad.1", "neg.1"]
    assert sorted(await store.delete("add")) == ["add.1", "add.7"]  # malformed ones too


async def test_watch_gives_the_current_deployments_then_every_change(
    store: Store, nc: NatsClient, archive: Archive
) -> None:
    first = deployment(archive, "add", 1)
    await store.put(first)
    await store.put(deployment(archive, "gone", 1))
    await store.delete("gone")
    updates = store.watch()
    try:
        current = {await anext(updates), await anext(updates)}
        assert current == {("add.1", first), ("gone.1", None)}  # deleted before: None
        second = deployment(archive, "add", 2)
        await store.put(second)
        assert await anext(updates) == ("add.2", second)
        await store.delete("add", 1)
        assert await anext(updates) == ("add.1", None)
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        await kv.put("add.2", b"[]")  # overwritten with garbage: no deployment there now
        assert await anext(updates) == ("add.2", None)
    finally:
        await updates.aclose()


async def test_watch_stops_when_cancelled(store: Store, archive: Archive) -> None:
    await store.put(deployment(archive))
    seen: list[str] = []
    got_one = asyncio.Event()

    async def follow() -> None:
        async for key, _ in store.watch():
            seen.append(key)
            got_one.set()

    task = asyncio.create_task(follow())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["add.1"]


async def test_opening_twice_binds_the_same_buckets(nc: NatsClient, archive: Archive) -> None:
    first = await Store.open(nc)
    await first.put(deployment(archive))
    again = await Store.open(nc, create=False)
    assert [d.key for d in await again.deployments()] == ["add.1"]


async def test_without_buckets_and_without_create_the_store_is_unavailable(
    nc: NatsClient,
) -> None:
    with pytest.raises(Unavailable, match="buckets do not exist yet"):
        await Store.open(nc, create=False)


async def test_without_jetstream_the_error_says_how_to_get_it() -> None:
    with inferbus.EmbeddedServer() as server:
        client = await nats.connect(server.url)
        try:
            with pytest.raises(Unavailable, match=r"JetStream is not enabled on this server: run "
                                                  r"`inferbus server`"):  # fmt: skip
                await Store.open(client)
        finally:
            await client.close()
