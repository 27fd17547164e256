"""A shared bus made from a roster, on real nats-server processes: raw nats-py connections, each
with the key ``inferbus roster apply`` made for it, try what their identity may and may not do."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import numpy as np
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import inferbus
from inferbus.contract import REQUEST_INFO_HEADER, requester_account
from inferbus.natsserver import Cluster, free_port
from inferbus.pipeline.connection import ConnectOptions, confirm_subscriptions, connect_nats
from inferbus.tenancy.credentials import KINDS, Identity
from inferbus.tenancy.keys import new_user_seed
from inferbus.tenancy.live import RosterServer
from tests.conftest import TEST_MODELS, eventually

ROSTER = """
[admins.teacher]

[workers.gpu1]

[groups.class]
models = ["add"]

[users.alice]
groups = ["class"]

[users.bob]
groups = ["class"]
"""


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[RosterServer]:
    """A nats-server made from ``ROSTER``; its state (keys, connection files) in tmp_path."""
    roster = tmp_path / "roster.toml"
    roster.write_text(ROSTER)
    with RosterServer(roster, tmp_path / "state", port=free_port()) as running:
        yield running
        print(f"--- nats-server log ---\n{running.server.log_text()}")


@dataclass
class Peer:
    """A raw connection as one identity, and what the server told it."""

    nats: NatsClient
    errors: list[Exception] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def violations(self) -> list[str]:
        """The permission violations reported, as nats-py words them (in lower case)."""
        return [str(e) for e in self.errors if "permissions violation" in str(e).lower()]


def identity(who: str) -> Identity:
    """``"user alice"`` as an ``Identity``."""
    kind, name = who.split()
    assert kind in KINDS
    return Identity(kind, name)


Connect = Callable[..., Awaitable[list[Peer]]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``worker, alice = await connect(bus, "worker gpu1", "user alice")``: a connection per
    identity, each with its seed file; closed at the end of the test."""
    peers: list[Peer] = []

    async def as_identities(running: RosterServer, *who: str) -> list[Peer]:
        seeds = [running.applied.credentials.seed_path(identity(w)) for w in who]
        return [await _connect(running.server.url, str(seed), peers) for seed in seeds]

    yield as_identities
    for peer in peers:
        await peer.nats.close()


async def _connect(url: str, seed: str, peers: list[Peer]) -> Peer:
    peer = Peer(NatsClient())

    async def on_error(exc: Exception) -> None:
        peer.errors.append(exc)

    async def on_closed() -> None:
        peer.closed.set()

    await peer.nats.connect(
        url, nkeys_seed=seed, error_cb=on_error, closed_cb=on_closed, allow_reconnect=False
    )
    peers.append(peer)
    return peer


async def serve_add(worker: Peer, seen: list[Msg] | None = None) -> None:
    """Answer ``inferbus.infer.add`` in the workers' queue group with the requester's account."""

    async def answer(msg: Msg) -> None:
        if seen is not None:
            seen.append(msg)
        await msg.respond(f"{requester_account(msg.headers)}:{msg.data.decode()}".encode())

    await worker.nats.subscribe("inferbus.infer.add", queue="add", cb=answer)
    await confirm_subscriptions(worker.nats)


async def test_a_request_reaches_the_worker_stamped_with_the_users_account(
    bus: RosterServer, connect: Connect
) -> None:
    worker, alice, bob = await connect(bus, "worker gpu1", "user alice", "user bob")
    seen: list[Msg] = []
    await serve_add(worker, seen)
    assert (await alice.nats.request("inferbus.infer.add", b"1", timeout=5)).data == b"alice:1"
    assert (await bob.nats.request("inferbus.infer.add", b"2", timeout=5)).data == b"bob:2"
    # A header the sender writes is replaced by the server's.
    forged = {REQUEST_INFO_HEADER: '{"acc":"bob","user":"bob"}'}
    reply = await alice.nats.request("inferbus.infer.add", b"3", timeout=5, headers=forged)
    assert reply.data == b"alice:3"
    # share: true adds the user's key (the account alone is there either way).
    keys = bus.applied.credentials.public_keys
    users = [orjson.loads((m.headers or {})[REQUEST_INFO_HEADER])["user"] for m in seen]
    assert users == [keys[identity(w)] for w in ("user alice", "user bob", "user alice")]
    # The reply subject is the server's mapping, not the user's inbox: no way back but the reply.
    assert all(msg.reply.startswith("_R_.") for msg in seen), [m.reply for m in seen]
    assert not worker.errors + alice.errors + bob.errors


@pytest.mark.parametrize("subject", ["inferbus.infer.>", "inferbus.infer.add", "$SRV.>", ">"])
async def test_a_user_may_subscribe_to_nothing_but_inboxes(
    bus: RosterServer, connect: Connect, subject: str
) -> None:
    (alice,) = await connect(bus, "user alice")
    await alice.nats.subscribe("_INBOX.mine.>")
    await alice.nats.subscribe(subject, queue="add" if subject.endswith("add") else "")
    await confirm_subscriptions(alice.nats)  # the server's -ERR comes before its PONG
    (refused,) = alice.violations()
    assert refused.startswith(
        f'nats: permissions violation for subscription to "{subject.lower()}"'
    )


async def test_a_user_cannot_answer_in_the_workers_place(
    bus: RosterServer, connect: Connect
) -> None:
    """Bob's attempt to join the model's queue group is refused, and so is a reply he sends to
    the reply subject the worker sees; every one of alice's requests is the worker's."""
    worker, alice, bob = await connect(bus, "worker gpu1", "user alice", "user bob")
    seen: list[Msg] = []
    await serve_add(worker, seen)

    async def answer_as_bob(msg: Msg) -> None:
        await msg.respond(b"bob")

    await bob.nats.subscribe("inferbus.infer.add", queue="add", cb=answer_as_bob)
    await confirm_subscriptions(bob.nats)
    replies = [await alice.nats.request("inferbus.infer.add", b"%d" % i) for i in range(20)]
    assert [r.data for r in replies] == [b"alice:%d" % i for i in range(20)]
    assert len(seen) == 20
    await bob.nats.publish(seen[-1].reply, b"forged")
    await confirm_subscriptions(bob.nats)
    assert len(bob.violations()) == 2, bob.errors
    assert "for subscription to" in bob.violations()[0]
    assert f'for publish to "{seen[-1].reply.lower()}"' in bob.violations()[1]


async def test_users_see_nothing_of_each_others_traffic(
    bus: RosterServer, connect: Connect
) -> None:
    """Bob listens on every inbox subject of his account; alice's replies never reach it. Bob's
    own reply, sent by the worker after alice's, is the proof that he would have seen them."""
    worker, alice, bob = await connect(bus, "worker gpu1", "user alice", "user bob")
    await serve_add(worker)
    heard: list[bytes] = []

    async def spy(msg: Msg) -> None:
        heard.append(msg.data)

    await bob.nats.subscribe("_INBOX.>", cb=spy)
    await confirm_subscriptions(bob.nats)
    for i in range(5):
        await alice.nats.request("inferbus.infer.add", b"secret%d" % i, timeout=5)
    assert (await bob.nats.request("inferbus.infer.add", b"mine", timeout=5)).data == b"bob:mine"
    await eventually(lambda: bool(heard), "bob's spy hears his own reply")
    assert heard == [b"bob:mine"]
    assert not bob.errors


async def test_a_worker_may_publish_nothing_but_one_reply_to_each_request(
    bus: RosterServer, connect: Connect
) -> None:
    worker, alice = await connect(bus, "worker gpu1", "user alice")

    async def answer_twice(msg: Msg) -> None:
        await msg.respond(b"first")
        await msg.respond(b"second")

    await worker.nats.subscribe("inferbus.infer.add", queue="add", cb=answer_twice)
    await confirm_subscriptions(worker.nats)
    heard: list[bytes] = []

    async def spy(msg: Msg) -> None:
        heard.append(msg.data)

    await alice.nats.subscribe("_INBOX.spy", cb=spy)
    await confirm_subscriptions(alice.nats)
    for subject in ("inferbus.infer.add", "inferbus.transfer.x", "$SRV.PING", "_INBOX.spy"):
        await worker.nats.publish(subject, b"unasked")
    await confirm_subscriptions(worker.nats)
    reply = await alice.nats.request("inferbus.infer.add", b"", timeout=5)
    assert reply.data == b"first"
    await confirm_subscriptions(worker.nats)
    refused = [re.sub(r'"_r_\.[^"]+"', '"_r_"', v) for v in worker.violations()]
    subjects = ("inferbus.infer.add", "inferbus.transfer.x", "$srv.ping", "_r_")
    assert refused == [f'nats: permissions violation for publish to "{s}"' for s in subjects]
    # Its own inbox it may publish to — in the workers' account, not in alice's.
    assert heard == []


async def test_a_connection_needs_a_key_the_roster_lists(bus: RosterServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_text(new_user_seed())
    anonymous = ConnectOptions(servers=[bus.server.url], creds=None, nkey=None, nkey_seed=None)
    password = f"nats://alice:alice@{bus.server.host}:{bus.server.port}"
    for options in (
        anonymous,
        ConnectOptions(servers=[bus.server.url], creds=None, nkey=str(stranger), nkey_seed=None),
        ConnectOptions(servers=[password], creds=None, nkey=None, nkey_seed=None),
    ):
        with pytest.raises(inferbus.ConnectionFailed, match="Authorization Violation"):
            await connect_nats(options)
    client = await connect_nats(
        ConnectOptions.from_file(bus.applied.connection_path(identity("user alice")))
    )
    assert client.is_connected
    await client.close()


async def test_reapplying_keeps_keys_and_cuts_off_removed_users_but_not_workers(
    bus: RosterServer, connect: Connect, tmp_path: Path
) -> None:
    worker, alice, bob = await connect(bus, "worker gpu1", "user alice", "user bob")
    seen: list[Msg] = []
    await serve_add(worker, seen)
    before = bus.applied.credentials
    seeds = {who: before.seed_path(who).read_text() for who in before.public_keys}
    bobs_seed = tmp_path / "bob-kept.nk"
    shutil.copy(before.seed_path(identity("user bob")), bobs_seed)

    bus.roster.write_text(ROSTER.replace("[users.bob]", "[users.carol]"))
    assert bus.reload()
    credentials = bus.applied.credentials
    assert credentials.added == (identity("user carol"),)
    assert credentials.removed == (identity("user bob"),)
    for who, seed in seeds.items():
        if who.name != "bob":
            assert credentials.seed_path(who).read_text() == seed, who
    assert not list((bus.state / "users").glob("bob.*"))
    await asyncio.wait_for(bob.closed.wait(), 10)
    refused = NatsClient()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await refused.connect(bus.server.url, nkeys_seed=str(bobs_seed), allow_reconnect=False)
    await refused.close()  # nats-py leaves the socket of a refused connect open

    (carol,) = await connect(bus, "user carol")
    assert (await carol.nats.request("inferbus.infer.add", b"", timeout=5)).data == b"carol:"
    assert (await alice.nats.request("inferbus.infer.add", b"", timeout=5)).data == b"alice:"
    assert worker.nats.is_connected
    assert not worker.closed.is_set()
    assert worker.nats.stats["reconnects"] == 0
    assert [requester_account(m.headers) for m in seen] == ["carol", "alice"]


async def test_a_broken_roster_edit_keeps_the_running_configuration(
    bus: RosterServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    assert not bus.poll()  # nothing changed
    bus.roster.write_text(ROSTER + "\n[users.eve]\nrate = 0\n")
    assert not bus.poll()
    assert "rate is a number of requests per second > 0" in caplog.text
    assert "keeps the previous one" in caplog.text
    assert not (bus.state / "users" / "eve.nk").exists()  # nothing written for a bad roster
    (alice,) = await connect(bus, "user alice")
    assert alice.nats.is_connected

    bus.roster.write_text(ROSTER.replace("[users.alice]", "[users.alicia]"))
    assert bus.poll()
    await asyncio.wait_for(alice.closed.wait(), 10)


def add_configs() -> list[inferbus.ModelConfig]:
    return [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "add"]


async def test_workers_and_clients_run_on_their_connection_files(bus: RosterServer) -> None:
    """The real worker and client, each with the file ``roster apply`` wrote for it: serving,
    discovery through the import, a call; the worker's roster grants alice add and bob nothing."""
    bus.roster.write_text(ROSTER.replace('[users.bob]\ngroups = ["class"]', "[users.bob]"))
    assert bus.reload()
    who = ("worker gpu1", "user alice", "user bob", "admin teacher")
    files = {w.split()[1]: bus.applied.connection_path(identity(w)) for w in who}
    x = {"x": np.ones((1, 4), dtype=np.float32)}
    async with (
        inferbus.Worker(add_configs(), ConnectOptions.from_file(files["gpu1"]), roster=bus.roster),
        inferbus.Client(ConnectOptions.from_file(files["alice"])) as alice,
        inferbus.Client(ConnectOptions.from_file(files["bob"])) as bob,
        inferbus.Client(ConnectOptions.from_file(files["teacher"])) as teacher,
    ):
        assert {m.name for m in await alice.models()} == {"add"}
        result = await alice.infer("add", x, version=1)
        np.testing.assert_array_equal(result["y"], np.full((1, 4), 2.0))
        with pytest.raises(inferbus.Forbidden):
            await bob.infer("add", x, version=1)
        assert (await teacher.infer("add", x, version=1))["y"].shape == (1, 4)


async def test_a_tensor_above_max_payload_crosses_the_accounts_both_ways(tmp_path: Path) -> None:
    """Chunked transfers (docs/PROTOCOL.md section 13) between a user's account and a worker's."""
    roster = tmp_path / "roster.toml"
    roster.write_text(ROSTER.replace('models = ["add"]', 'models = ["big"]'))
    inputs = {"x": np.random.default_rng(0).integers(0, 256, (4096, 1024), dtype=np.uint8)}
    big = dataclasses.replace(inferbus.load_model_config(TEST_MODELS / "blob"), name="big")
    with RosterServer(roster, tmp_path / "state", port=free_port(), max_payload=1 << 20) as bus:
        files = [bus.applied.connection_path(identity(w)) for w in ("worker gpu1", "user alice")]
        async with (
            inferbus.Worker([big], ConnectOptions.from_file(files[0]), roster=roster),
            inferbus.Client(ConnectOptions.from_file(files[1])) as alice,
        ):
            result = await alice.infer("big", inputs, timeout=30)
    np.testing.assert_array_equal(result["y"], inputs["x"])


async def test_the_accounts_span_a_cluster(tmp_path: Path) -> None:
    """Two nodes from one roster and one state folder (so the same keys): a worker on one, a
    user on the other; the request crosses the route and the accounts, and is stamped."""
    roster = tmp_path / "roster.toml"
    roster.write_text(ROSTER)
    routes = [free_port(), free_port()]
    nodes = [
        RosterServer(
            roster,
            tmp_path / "state",
            port=free_port(),
            cluster=Cluster(f"n{i}", routes[i], (routes[1 - i],)),
        )
        for i in range(2)
    ]
    keys = nodes[0].applied.credentials
    peers: list[Peer] = []
    with nodes[0], nodes[1]:
        try:
            worker_seed = str(keys.seed_path(identity("worker gpu1")))
            worker = await _connect(nodes[0].server.url, worker_seed, peers)
            alice_seed = str(keys.seed_path(identity("user alice")))
            alice = await _connect(nodes[1].server.url, alice_seed, peers)
            await serve_add(worker)
            reply = None
            for _ in range(250):  # until the route has told node 1 of the worker's subscription
                with contextlib.suppress(nats.errors.NoRespondersError):
                    reply = await alice.nats.request("inferbus.infer.add", b"x", timeout=5)
                    break
                await asyncio.sleep(0.02)
            assert reply is not None
            assert reply.data == b"alice:x"
        finally:
            for peer in peers:
                await peer.nats.close()
