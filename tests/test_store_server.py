"""JetStream on the embedded server: its config, a store that outlives the server, one server per
store folder; on a shared bus the store is in the workers' account, which admins and workers
use, while users have no JetStream and deploy through a worker."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig

import inferbus
from inferbus import cli
from inferbus.cli import build_parser
from inferbus.errors import ConfigError, ServerError, Unavailable
from inferbus.natsserver import free_port
from inferbus.pipeline.connection import ConnectOptions
from inferbus.store.archive import pack
from inferbus.store.client import Store, jetstream_access
from inferbus.store.deploy import owner_of
from inferbus.store.reconcile import StoreSettings
from inferbus.store.records import CLAIMS_BUCKET, Deployment
from inferbus.tenancy.commands import open_settings
from inferbus.tenancy.credentials import Identity
from inferbus.tenancy.live import RosterServer
from inferbus.tenancy.settings import server_settings
from tests.conftest import TEST_MODELS

ROSTER = """
[admins.teacher]
[workers.gpu1]
[groups.class]
models = ["add"]
[users.alice]
groups = ["class"]
"""


def test_the_jetstream_block(tmp_path: Path) -> None:
    assert "jetstream" not in inferbus.EmbeddedServer().config_text()
    given = inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path, max_file_store=1 << 30)
    text = given.config_text()
    assert f'jetstream {{\n  store_dir: "{tmp_path}"\n  max_memory_store: 268435456\n' in text
    assert "max_file_store: 1073741824\n}" in text
    with inferbus.EmbeddedServer(jetstream=True) as server:  # a temporary store
        store_dir = server.jetstream_dir
        assert store_dir is not None
        assert store_dir.is_dir()
        assert (
            f'store_dir: "{store_dir}"' in Path(store_dir.parent / "nats-server.conf").read_text()
        )
    assert not store_dir.exists()


async def test_deployments_and_archives_outlive_the_server(tmp_path: Path) -> None:
    archive = pack(TEST_MODELS / "add_v1", tmp_path / "add.tar")
    put = Deployment("add", 1, archive.sha256, archive.size)
    with inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js") as server:
        client = await nats.connect(server.url)
        store = await Store.open(client)
        await store.upload(archive)
        await store.put(put)
        assert await owner_of(client) == ""  # an open bus: no account to name
        await client.close()
    with inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js") as server:
        client = await nats.connect(server.url)
        store = await Store.open(client, create=False)
        assert await store.deployments() == [put]
        await store.download(archive.sha256, tmp_path / "down.tar")
        await client.close()


def test_one_server_per_store_folder(tmp_path: Path) -> None:
    with inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js"):
        second = inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js")
        with pytest.raises(ServerError, match="in use by another server"):
            second.start()
    with inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js"):
        pass  # free again once the first stopped


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_server_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    default = open_settings(parse("server"))
    assert (default.jetstream, default.store_dir) == (True, tmp_path / "data/inferbus/jetstream")
    given = open_settings(parse("up", "repo", "--store-dir", "js"))
    assert given.store_dir == Path("js").resolve()
    off = open_settings(parse("server", "--no-jetstream"))
    assert (off.jetstream, off.server("").jetstream) == (False, False)


def test_the_rosters_server_table(tmp_path: Path) -> None:
    settings = server_settings({"store_dir": "js", "jetstream": True}, tmp_path)
    assert settings.store_dir == tmp_path / "js"
    assert not server_settings({"jetstream": False}, tmp_path).jetstream
    with pytest.raises(ConfigError, match="jetstream is true or false"):
        server_settings({"jetstream": "yes"}, tmp_path)


# --- a shared bus ---------------------------------------------------------------------------------


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[RosterServer]:
    roster = tmp_path / "roster.toml"
    roster.write_text(ROSTER)
    with RosterServer(roster, tmp_path / "state", port=free_port()) as running:
        yield running
        print(f"--- nats-server log ---\n{running.server.log_text()}")


@pytest.fixture
async def as_identity(bus: RosterServer) -> AsyncIterator[dict[str, NatsClient]]:
    """A connection for each identity of the roster, by kind."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    connections: dict[str, NatsClient] = {}
    for who in (
        Identity("admin", "teacher"),
        Identity("worker", "gpu1"),
        Identity("user", "alice"),
    ):
        seed = bus.applied.credentials.seed_path(who)
        connections[who.kind] = await nats.connect(
            bus.server.url, nkeys_seed=str(seed), error_cb=on_error, allow_reconnect=False
        )
    yield connections
    for connection in connections.values():
        await connection.close()


def test_a_roster_keeps_its_store_in_the_state_folder(bus: RosterServer, tmp_path: Path) -> None:
    assert bus.server.jetstream_dir == (tmp_path / "state" / "jetstream").resolve()
    written = (tmp_path / "state" / "nats-server.conf").read_text()
    assert f'store_dir: "{bus.server.jetstream_dir}"' in written
    inferbus_account = written[written.index('"INFERBUS": {') :].split("users:")[0]
    assert "jetstream: enabled" in inferbus_account
    assert written.count("jetstream: enabled") == 1  # users' accounts have none


async def test_admins_and_workers_use_the_store_users_have_no_jetstream(
    as_identity: dict[str, NatsClient], tmp_path: Path
) -> None:
    archive = pack(TEST_MODELS / "add_v1", tmp_path / "add.tar")
    put = Deployment("add", 1, archive.sha256, archive.size)
    # A worker may make the buckets (it may start before anyone deployed), and write them: it
    # deploys for users who deploy through it (inferbus.store.service).
    worker_js = as_identity["worker"]
    worker = await Store.open(worker_js, timeout=1)
    await worker.upload(archive)
    await worker.put(put)
    claims = await worker_js.jetstream(timeout=1).create_key_value(
        KeyValueConfig(bucket=CLAIMS_BUCKET, history=1, ttl=30)
    )
    await claims.create("add.1.0", b"gpu1")
    assert (await claims.get("add.1.0")).value == b"gpu1"
    # ... but never delete or reconfigure a bucket.
    for stream in ("KV_inferbus-deployments", "OBJ_inferbus-models", "KV_inferbus-claims"):
        with pytest.raises(TimeoutError):
            await worker_js.jetstream(timeout=0.5).delete_stream(stream)

    assert await owner_of(as_identity["admin"]) == "INFERBUS"  # what a deployment records
    admin = await Store.open(as_identity["admin"])
    assert await admin.deployments() == [put]
    updates = worker.watch()
    assert await anext(updates) == ("add.1", put)
    await admin.delete("add", 1)
    assert await anext(updates) == ("add.1", None)
    await updates.aclose()
    await worker.download(archive.sha256, tmp_path / "down.tar")

    user = as_identity["user"]
    assert await jetstream_access(worker_js)
    assert not await jetstream_access(user)  # answered at once: deploy through a worker
    with pytest.raises(Unavailable):
        await Store.open(user, timeout=0.5)


async def test_a_user_deploys_through_a_store_worker_with_the_cli(
    bus: RosterServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    settings = StoreSettings(cache_dir=tmp_path / "cache", device="cpu")
    options = ConnectOptions.from_file(state / "workers" / "gpu1.toml", name="store-worker")
    async with inferbus.Worker([], options, roster=bus.roster, store=settings):
        alice = ["--connection", str(state / "users" / "alice.toml")]
        argv = ["deploy", str(TEST_MODELS / "add_v1"), "--name", "alice-add", "--wait", "30"]
        assert await asyncio.to_thread(cli.main, [*argv, *alice]) == 0
        out = capsys.readouterr().out
        assert "deploying through a store worker" in out
        assert "alice-add v1 is served by 1 worker(s)" in out
        async with inferbus.connect(connection=alice[1]) as client:
            result = await client.infer("alice-add", {"x": np.ones((1, 4), np.float32)})
            np.testing.assert_array_equal(result["y"], np.full((1, 4), 2, np.float32))
        argv[3] = "someone-else"
        assert await asyncio.to_thread(cli.main, [*argv, *alice]) == 1
        assert "may deploy only models named alice-" in capsys.readouterr().err
        assert await asyncio.to_thread(cli.main, ["undeploy", "alice-add", *alice]) == 0
        assert "undeployed alice-add.1" in capsys.readouterr().out
