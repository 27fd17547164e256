"""A worker on a shared bus: identity from the server-written header, grants (403), quotas
(429 with retry-after), per-user usage, and discovery of granted models only.

The bus is a real nats-server with the account layout the roster generates (docs/SECURITY.md),
written out here with passwords so the worker's side is tested on its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import orjson
import pytest

import inferbus
from inferbus.contract import service_subject
from inferbus.pipeline.policy import ADMIN, Tenancy
from tests.conftest import TEST_MODELS

ROSTER = """
[admins.admin]
[workers.w]

[groups.class]
models = ["add"]
rows_in_flight = 64

[users.alice]
groups = ["class"]
[users.bob]
models = ["echo"]
[users.carol]
groups = ["class"]
rate = 1
burst = 1
"""

IMPORTS = """
    imports: [
      {service: {account: INFERBUS, subject: "inferbus.infer.>"}, share: true}
      {service: {account: INFERBUS, subject: "inferbus.transfer.>"}, share: true}
      {service: {account: INFERBUS, subject: "$SRV.>"}, share: true}
    ]"""

ACCOUNTS = (
    """
accounts {
  INFERBUS {
    users: [
      {user: admin, password: admin}
      {user: w, password: w, permissions: {publish: {allow: ["_INBOX.>"]},
       subscribe: {allow: ["inferbus.>", "$SRV.>", "_INBOX.>"]}, allow_responses: true}}
    ]
    exports: [
      {service: "inferbus.infer.>"}
      {service: "inferbus.transfer.>"}
      {service: "$SRV.>", response_type: stream}
    ]
  }
"""
    + "".join(
        f"  {name} {{\n    users: [{{user: {name}, password: {name}}}]{IMPORTS}\n  }}\n"
        for name in ("alice", "bob", "carol")
    )
    + "}\n"
)


@pytest.fixture
def roster(tmp_path: Path) -> Path:
    path = tmp_path / "roster.toml"
    path.write_text(ROSTER)
    return path


@pytest.fixture
def shared_server() -> AsyncIterator[inferbus.EmbeddedServer]:  # type: ignore[misc]
    with inferbus.EmbeddedServer(extra_config=ACCOUNTS) as server:
        yield server


def url(server: inferbus.EmbeddedServer, user: str) -> str:
    return f"nats://{user}:{user}@{server.host}:{server.port}"


@pytest.fixture
async def shared_worker(
    shared_server: inferbus.EmbeddedServer, roster: Path
) -> AsyncIterator[inferbus.Worker]:
    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name in ("add", "echo")]
    options = inferbus.ConnectOptions(servers=[url(shared_server, "w")], name="test-worker")
    async with inferbus.Worker(configs, options, roster=roster) as worker:
        yield worker


def quick() -> inferbus.RetryPolicy:
    return inferbus.RetryPolicy(max_attempts=1, backoff_s=0.0, max_backoff_s=0.0)


# --- the policy on its own ----------------------------------------------------------------------


def test_grants_rates_and_rows_in_flight(roster: Path) -> None:
    tenancy = Tenancy(roster)
    tenancy.admit("alice", "add")
    with pytest.raises(inferbus.Forbidden, match="model 'echo' is not granted to 'alice'"):
        tenancy.admit("alice", "echo")
    with pytest.raises(inferbus.Forbidden, match="not granted to 'mallory'"):
        tenancy.admit("mallory", "add")
    tenancy.admit(ADMIN, "anything")  # from inside the workers' account: no checks
    tenancy.admit("carol", "add")  # her one token
    with pytest.raises(inferbus.Overloaded, match="over their rate of 1 requests/s") as refused:
        tenancy.admit("carol", "add")
    assert refused.value.retry_after_s is not None
    assert 0 < refused.value.retry_after_s <= 1.0
    tenancy.take_rows("alice", 60)
    with pytest.raises(inferbus.Overloaded, match="60 rows in flight here; their limit is 64"):
        tenancy.take_rows("alice", 8)
    tenancy.release_rows("alice", 60)
    tenancy.take_rows("alice", 64)


def test_the_roster_is_reread_when_it_changes_and_kept_when_broken(roster: Path) -> None:
    tenancy = Tenancy(roster)
    assert not tenancy.reload_if_changed()
    roster.write_text(ROSTER.replace('models = ["echo"]', 'models = ["echo", "add"]'))
    os.utime(roster, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    assert tenancy.reload_if_changed()
    tenancy.admit("bob", "add")
    roster.write_text("[users.bob]\nmodels = 7\n")
    os.utime(roster, ns=(2, 2))
    assert not tenancy.reload_if_changed()  # logged; the previous roster stays
    tenancy.admit("bob", "add")


# --- a worker on a real shared bus --------------------------------------------------------------


@pytest.mark.usefixtures("shared_worker")
async def test_granted_models_answer_and_others_are_forbidden(
    shared_server: inferbus.EmbeddedServer,
) -> None:
    x = np.ones((2, 4), np.float32)
    async with inferbus.connect(url(shared_server, "alice"), retry=quick()) as alice:
        result = await alice.infer("add", x)
        np.testing.assert_array_equal(result["y"], x + 2)  # add v2: the highest version
        with pytest.raises(inferbus.Forbidden, match="model 'echo' is not granted to 'alice'"):
            await alice.infer("echo", {"f32": x})
        # A bare array needs the model's input name from discovery, which hides echo from her.
        with pytest.raises(inferbus.ModelNotFound, match="or it is not granted to you"):
            await alice.infer("echo", x)
    async with inferbus.connect(url(shared_server, "bob"), retry=quick()) as bob:
        with pytest.raises(inferbus.Forbidden, match="not granted to 'bob'"):
            await bob.infer("add", {"x": x})


@pytest.mark.usefixtures("shared_worker")
async def test_discovery_shows_each_user_their_models(
    shared_server: inferbus.EmbeddedServer,
) -> None:
    async with inferbus.connect(url(shared_server, "alice")) as alice:
        assert {m.name for m in await alice.models(until=lambda _: True)} == {"add"}
    async with inferbus.connect(url(shared_server, "bob")) as bob:
        assert {m.name for m in await bob.models(until=lambda _: True)} == {"echo"}
    async with inferbus.connect(url(shared_server, "admin")) as admin:
        assert {m.name for m in await admin.models(until=lambda _: True)} == {"add", "echo"}


async def user_rows(client: inferbus.Client, endpoint: str) -> dict[str, dict[str, float]]:
    reply = await client.nats.request(service_subject("STATS"), b"", timeout=5)
    (stats,) = [e for e in orjson.loads(reply.data)["endpoints"] if e["name"] == endpoint]
    users: dict[str, dict[str, float]] = stats["data"]["users"]
    return users


@pytest.mark.usefixtures("shared_worker")
async def test_usage_is_counted_per_user_and_shown_to_each_only_their_own(
    shared_server: inferbus.EmbeddedServer,
) -> None:
    x = np.ones((3, 4), np.float32)
    async with (
        inferbus.connect(url(shared_server, "alice")) as alice,
        inferbus.connect(url(shared_server, "carol"), retry=quick()) as carol,
        inferbus.connect(url(shared_server, "admin")) as admin,
    ):
        for _ in range(4):
            await alice.infer("add", x)
        await carol.infer("add", x)
        with pytest.raises(inferbus.Overloaded, match="over their rate") as refused:
            await carol.infer("add", x, timeout=0.2)  # the next token is 1 s away: no retry
        assert refused.value.retry_after_s is not None
        everyone = await user_rows(admin, "add")
        assert everyone["alice"]["requests"] == 4
        assert everyone["alice"]["rows"] == 12
        assert everyone["alice"]["compute_s"] > 0
        assert everyone["carol"]["requests"] == 1
        assert everyone["carol"]["refused"] == 1
        assert set(await user_rows(alice, "add")) == {"alice"}


class AddOne(inferbus.Model[np.ndarray, np.ndarray]):
    name = "add"
    version = 1

    def postprocess(self, outputs: inferbus.InferResult) -> np.ndarray:
        return np.asarray(outputs["y"])


@pytest.mark.usefixtures("shared_worker")
async def test_model_map_and_discovery_work_for_a_user(
    shared_server: inferbus.EmbeddedServer,
) -> None:
    """What a student uses, on a shared bus: ``Model``, ``map`` (packed and not), ``describe``."""
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    async with inferbus.connect(url(shared_server, "alice")) as alice:
        np.testing.assert_array_equal(await AddOne(alice)(rows[:2]), rows[:2] + 1)
        for pack in (1, 4):
            mapped = [r async for r in alice.map("add", rows, version=1, pack=pack)]
            np.testing.assert_array_equal(np.concatenate([r["y"] for r in mapped]), rows + 1)
        assert (await alice.describe("add", 1)).signature.inputs[0].name == "x"


async def test_per_user_series_in_prometheus_keep_a_bounded_label_set(
    shared_server: inferbus.EmbeddedServer, roster: Path
) -> None:
    from inferbus.natsserver import free_port
    from tests.test_metrics import scrape, value

    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "add"]
    options = inferbus.ConnectOptions(servers=[url(shared_server, "w")], name="test-worker")
    port = free_port()
    x = np.ones((3, 4), np.float32)
    async with (
        inferbus.Worker(configs, options, roster=roster, metrics_port=port) as worker,
        inferbus.connect(url(shared_server, "alice")) as alice,
        inferbus.connect(url(shared_server, "bob"), retry=quick()) as bob,
    ):
        for _ in range(2):
            await alice.infer("add", {"x": x}, version=1)
        with pytest.raises(inferbus.Forbidden):
            await bob.infer("add", {"x": x}, version=1)
        text = await asyncio.to_thread(scrape, port)
        # Users who leave the roster keep their counts, under one label for all of them.
        await asyncio.to_thread(roster.write_text, ROSTER.replace("alice]", "alicia]"))
        os.utime(roster, ns=(1, 1))
        assert worker.tenancy is not None
        assert worker.tenancy.reload_if_changed()
        after = await asyncio.to_thread(scrape, port)
    alice_add = '{model="add",user="alice",version="1"}'
    assert value(text, f"inferbus_user_request_total{alice_add}") == 2
    assert value(text, f"inferbus_user_rows_total{alice_add}") == 6
    assert value(text, f"inferbus_user_compute_seconds_total{alice_add}") > 0
    assert value(text, 'inferbus_user_refused_total{model="add",user="bob",version="1"}') == 1
    other = '{model="add",user="(other)",version="1"}'
    assert value(after, f"inferbus_user_request_total{other}") == 2
    assert f"inferbus_user_request_total{alice_add}" not in after
