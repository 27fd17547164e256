"""The gateway on a shared bus (``--per-user``): each caller's HTTP basic credentials become
their own NATS identity, so the worker's grants (403) see who asked; without credentials, or
with ones nats-server refuses, 401. The bus is test_tenancy's: accounts with passwords."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

import inferbus
from inferbus.gateway.identities import PerUser
from inferbus.natsserver import free_port
from inferbus.tenancy.keys import new_user_seed
from tests.conftest import TEST_MODELS
from tests.test_tenancy import ACCOUNTS, ROSTER

ADD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
ECHO = {"inputs": [{"name": "f32", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}


@pytest.fixture
def bus() -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer(extra_config=ACCOUNTS) as server:
        yield server


@pytest.fixture
async def roster_worker(bus: inferbus.EmbeddedServer, tmp_path: Path) -> AsyncIterator[None]:
    roster = tmp_path / "roster.toml"
    roster.write_text(ROSTER)
    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name in ("add", "echo")]
    url = f"nats://w:w@{bus.host}:{bus.port}"
    options = inferbus.ConnectOptions(servers=[url], name="test-worker")
    async with inferbus.Worker(configs, options, roster=roster):
        yield


@contextlib.contextmanager
def per_user_gateway(servers: str) -> Iterator[str]:
    """``inferbus gateway --per-user --servers servers`` as a process: its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "inferbus", "gateway", "--per-user", "--servers", servers,
               "--port", str(port)]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        assert f"127.0.0.1:{port}" in process.stdout.readline()
        yield f"http://127.0.0.1:{port}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


@pytest.fixture
def gateway(bus: inferbus.EmbeddedServer) -> Iterator[str]:
    """``inferbus gateway --per-user``, with no NATS identity of its own."""
    with per_user_gateway(bus.url) as url:
        yield url


@pytest.mark.usefixtures("roster_worker")
async def test_each_caller_is_their_own_nats_identity(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        alice = await http.post("/v2/models/add/infer", json=ADD, auth=("alice", "alice"))
        assert alice.status_code == 200, alice.text
        assert alice.json()["outputs"][0]["data"] == [3.0, 4.0, 5.0, 6.0]  # add v2
        refused = await http.post("/v2/models/echo/infer", json=ECHO, auth=("alice", "alice"))
        assert refused.status_code == 403
        assert "not granted to 'alice'" in refused.json()["error"]
        bob = await http.post("/v2/models/add/infer", json=ADD, auth=("bob", "bob"))
        assert bob.status_code == 403
        assert "not granted to 'bob'" in bob.json()["error"]
        echo = await http.post("/v2/models/echo/versions/1", auth=("bob", "bob"))
        assert echo.status_code == 405  # metadata is a GET
        assert (await http.get("/v2/models/add", auth=("bob", "bob"))).status_code == 404


@pytest.mark.usefixtures("roster_worker")
async def test_missing_or_refused_credentials_are_401(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        anonymous = await http.post("/v2/models/add/infer", json=ADD)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
        wrong = await http.post("/v2/models/add/infer", json=ADD, auth=("alice", "nope"))
        assert wrong.status_code == 401, wrong.text


async def test_idle_user_connections_are_closed_and_busy_ones_kept(
    bus: inferbus.EmbeddedServer,
) -> None:
    """A user's connection with no request for ``idle_close_s`` is closed (and reopened on their
    next request); one with a request in flight is not, however old."""
    identities = PerUser(inferbus.ConnectOptions(servers=[bus.url]), idle_close_s=0.05)
    alice, bob = _basic("alice", "alice"), _basic("bob", "bob")
    try:
        async with identities.using(alice) as first:
            pass
        async with identities.using(bob) as busy:
            await asyncio.sleep(0.1)  # both older than idle_close_s; bob's still in use
            assert await identities.close_idle() == 1
            assert first.transport.nats.is_closed
            assert not busy.transport.nats.is_closed
        async with identities.using(alice) as again:
            assert again is not first
            assert again.transport.nats.is_connected
    finally:
        await identities.close()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.usefixtures("roster_worker")
async def test_the_gateways_own_credentials_are_never_lent(bus: inferbus.EmbeddedServer) -> None:
    """A gateway whose URL carries an admin's password: a caller with a made-up nkey seed must
    not ride on it (401, and the reply names neither the password nor the server)."""
    with per_user_gateway(f"nats://admin:s3cret-admin@{bus.host}:{bus.port}") as gateway:
        async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
            stranger = await http.post("/v2/models/echo/infer", json=ECHO,
                                       auth=("nobody", new_user_seed()))  # fmt: skip
            assert stranger.status_code == 401, stranger.text
            assert "s3cret" not in stranger.text
            assert str(bus.port) not in stranger.text
            garbled = await http.post("/v2/models/add/infer", json=ADD, auth=("x", "SUgarbage"))
            assert garbled.status_code == 401
            assert "not a valid nkey seed" in garbled.json()["error"]


@pytest.mark.usefixtures("roster_worker")
async def test_the_dashboard_shows_each_caller_their_own_view(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        anonymous = await http.get("/")
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
        assert (await http.get("/", auth=("alice", "nope"))).status_code == 401
        page = await http.get("/", auth=("alice", "alice"))
        assert page.status_code == 200
        assert '"name":"add"' in page.text  # granted to alice
        assert '"name":"echo"' not in page.text  # served, but not hers to see
