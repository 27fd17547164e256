"""Deploying on a shared bus: users deploy through a store worker, under their own prefix,
within their limits, without code unless the roster allows; and call what they deployed.
Real nats-server with accounts and JetStream (the workers' account only)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

import inferbus
from inferbus.pipeline.discovery import Directory
from inferbus.store.archive import Archive, pack
from inferbus.store.reconcile import StoreSettings
from inferbus.store.remote import deploy_remote, undeploy_remote
from tests.conftest import TEST_MODELS

ROSTER = """
[workers.w]
[users.alice]
deployments = 1
[users.bob]
deploy_code = true
"""

IMPORTS = """
    imports: [
      {service: {account: INFERBUS, subject: "inferbus.infer.>"}, share: true}
      {service: {account: INFERBUS, subject: "inferbus.transfer.>"}, share: true}
      {service: {account: INFERBUS, subject: "inferbus.store.>"}, share: true}
      {service: {account: INFERBUS, subject: "$SRV.>"}, share: true}
    ]"""

ACCOUNTS = (
    """
accounts {
  INFERBUS {
    jetstream: enabled
    users: [{user: w, password: w}]
    exports: [
      {service: "inferbus.infer.>"}
      {service: "inferbus.transfer.>"}
      {service: "inferbus.store.>"}
      {service: "$SRV.>", response_type: stream}
    ]
  }
"""
    + "".join(
        f"  {name} {{\n    users: [{{user: {name}, password: {name}}}]{IMPORTS}\n  }}\n"
        for name in ("alice", "bob")
    )
    + "}\n"
)
X = np.ones((2, 4), np.float32)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer(
        extra_config=ACCOUNTS, jetstream=True, store_dir=tmp_path / "js"
    ) as server:
        yield server


def as_user(server: inferbus.EmbeddedServer, user: str) -> inferbus.ConnectOptions:
    return inferbus.ConnectOptions(servers=[f"nats://{user}:{user}@{server.host}:{server.port}"])


@pytest.fixture
async def worker(bus: inferbus.EmbeddedServer, tmp_path: Path) -> AsyncIterator[inferbus.Worker]:
    roster = tmp_path / "roster.toml"
    roster.write_text(ROSTER)
    store = StoreSettings(cache_dir=tmp_path / "cache", device="cpu", allow_code=True)
    async with inferbus.Worker([], as_user(bus, "w"), roster=roster, store=store) as running:
        yield running


async def packed(folder: Path, tmp_path: Path, name: str) -> Archive:
    return await asyncio.to_thread(pack, folder, tmp_path / f"{name}.tar")


@pytest.mark.usefixtures("worker")
async def test_a_user_deploys_under_their_prefix_and_calls_it(
    bus: inferbus.EmbeddedServer, tmp_path: Path
) -> None:
    alice = as_user(bus, "alice")
    archive = await packed(TEST_MODELS / "add_v1", tmp_path, "add")
    answer = await deploy_remote(alice, archive, {"model": "alice-add", "version": 1})
    assert answer == {"key": "alice-add.1", "sha256": archive.sha256}
    async with inferbus.Client(alice) as client:
        result = await client.infer("alice-add", {"x": X}, timeout=30)
        np.testing.assert_array_equal(result["y"], X + 1)
    with pytest.raises(inferbus.Forbidden, match="may deploy only models named alice-"):
        await deploy_remote(alice, archive, {"model": "add", "version": 1})
    with pytest.raises(inferbus.Forbidden, match="the limit is 1"):
        await deploy_remote(alice, archive, {"model": "alice-other", "version": 1})
    bob = as_user(bus, "bob")
    with pytest.raises(inferbus.Forbidden, match="deployed by someone else"):
        await undeploy_remote(bob, "alice-add", None)
    assert await undeploy_remote(alice, "alice-add", None) == ["alice-add.1"]


@pytest.mark.usefixtures("worker")
async def test_code_is_deployed_only_by_users_the_roster_allows(
    bus: inferbus.EmbeddedServer, tmp_path: Path
) -> None:
    folder = tmp_path / "with-code"
    shutil.copytree(TEST_MODELS / "add_v1", folder)
    (folder / "hooks.py").write_text("# any Python file is code\n")
    archive = await packed(folder, tmp_path, "code")
    with pytest.raises(inferbus.Forbidden, match="does not let 'alice' deploy code"):
        await deploy_remote(as_user(bus, "alice"), archive, {"model": "alice-x", "version": 1})
    answer = await deploy_remote(as_user(bus, "bob"), archive, {"model": "bob-x", "version": 1})
    assert answer["key"] == "bob-x.1"


@pytest.mark.usefixtures("worker")
async def test_a_user_cannot_make_workers_load_models_not_granted_to_them(
    bus: inferbus.EmbeddedServer, tmp_path: Path
) -> None:
    """Load on demand evicts other models: on a shared bus only a model's grantees may ask."""
    archive = await packed(TEST_MODELS / "add_v1", tmp_path, "add")
    await deploy_remote(as_user(bus, "alice"), archive, {"model": "alice-add", "version": 1})
    async with inferbus.Client(as_user(bus, "bob")) as bob:
        with pytest.raises(inferbus.Forbidden, match="'alice-add' is not granted to 'bob'"):
            await Directory(bob.nats).demand("alice-add", None, timeout=5)
