"""``inferbus deploy``, ``undeploy`` and ``deployments``: their main() against a real nats-server
with JetStream, without a worker (upload and record only) and with one (a rollout)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import inferbus
from inferbus import cli
from inferbus.natsserver import free_port
from inferbus.store.reconcile import StoreSettings
from tests.conftest import TEST_MODELS
from tests.test_roster_cli import read_until, start


@pytest.fixture
def jetstream(tmp_path: Path) -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer(jetstream=True, store_dir=tmp_path / "js") as server:
        yield server


def run(server: inferbus.EmbeddedServer, *argv: str) -> int:
    return cli.main([*argv, "--servers", server.url])


def deployed(
    server: inferbus.EmbeddedServer, capsys: pytest.CaptureFixture[str], timeout: float = 0.1
) -> Any:
    """What ``inferbus deployments --json`` says (workers get ``timeout`` seconds to answer)."""
    capsys.readouterr()
    assert run(server, "deployments", "--json", "--timeout", str(timeout)) == 0
    return orjson.loads(capsys.readouterr().out)


@pytest.mark.parametrize("command", ["deploy", "undeploy", "deployments"])
def test_the_store_commands_explain_themselves(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: inferbus" in out
    assert "--servers" in out
    if command == "deploy":
        assert "runs that code, so deploy only what you trust" in " ".join(out.split())


def test_deploy_without_a_worker_uploads_and_records(
    jetstream: inferbus.EmbeddedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(jetstream, "deploy", str(TEST_MODELS / "add_v1"), "--wait", "0",
               "--replicas", "2", "--device", "cpu") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "add: loads here (cpu); in x: FP32 [-1, 4], out y: FP32 [-1, 4]" in out
    assert "deployed add v1: 10,240 bytes" in out
    [row] = deployed(jetstream, capsys)
    assert (row["model"], row["version"], row["replicas"], row["device"]) == ("add", 1, 2, "cpu")
    assert (row["memory_mb"], row["has_code"], row["workers"]) == (1, False, [])
    assert row["state"] == "not loaded (no worker is running)"
    # The same files again: nothing is uploaded, the record is written again.
    assert run(jetstream, "deploy", str(TEST_MODELS / "add_v1"), "--wait", "0") == 0
    assert "the store held this archive already" in capsys.readouterr().out
    assert run(jetstream, "deployments") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["MODEL", "VERSION", "REPLICAS"]
    assert table[1].split()[:4] == ["add", "1", "any", "any"]


def test_a_version_keeps_its_files(
    jetstream: inferbus.EmbeddedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(jetstream, "deploy", str(TEST_MODELS / "add_v1"), "--wait", "0") == 0
    assert run(jetstream, "deploy", str(TEST_MODELS / "add_v2"), "--version", "1") == 1
    assert "deploy this as --version 2" in capsys.readouterr().err
    assert [r["version"] for r in deployed(jetstream, capsys)] == [1]


def test_code_is_deployed_only_when_allowed(
    jetstream: inferbus.EmbeddedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(TEST_MODELS / "failing")
    assert run(jetstream, "deploy", folder, "--wait", "0") == 1
    err = capsys.readouterr().err
    assert "ships code (failing_engine.py)" in err
    assert "--allow-code" in err
    assert deployed(jetstream, capsys) == []
    assert run(jetstream, "deploy", folder, "--wait", "0", "--allow-code", "--skip-check") == 0
    assert [r["has_code"] for r in deployed(jetstream, capsys)] == [True]


def test_undeploy(jetstream: inferbus.EmbeddedServer, capsys: pytest.CaptureFixture[str]) -> None:
    for folder in ("add_v1", "add_v2"):
        assert run(jetstream, "deploy", str(TEST_MODELS / folder), "--keep-old") == 0
    assert run(jetstream, "undeploy", "add@1") == 0
    assert "undeployed add.1" in capsys.readouterr().out
    assert run(jetstream, "undeploy", "add@1") == 1
    assert "nothing is deployed as add@1" in capsys.readouterr().err
    assert run(jetstream, "undeploy", "add@one") == 1
    assert "expected MODEL or MODEL@VERSION" in capsys.readouterr().err
    assert run(jetstream, "undeploy", "add") == 0
    assert deployed(jetstream, capsys) == []


def test_a_model_that_does_not_load_is_not_deployed(
    jetstream: inferbus.EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.toml").write_text('file = "model.onnx"\n')
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    assert run(jetstream, "deploy", str(folder), "--wait", "0") == 1
    assert "the model does not load here" in capsys.readouterr().err
    (folder / "config.toml").write_text('engine = "tensorrt"\nfile = "model.onnx"\n')
    assert run(jetstream, "deploy", str(folder), "--wait", "0") == 0
    assert "not checked here: TensorRT plans are built" in capsys.readouterr().out


def test_without_jetstream_the_commands_say_how_to_get_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with inferbus.EmbeddedServer() as server:
        assert run(server, "deploy", str(TEST_MODELS / "add_v1"), "--wait", "0") == 1
        assert "JetStream is not enabled on this server: run `inferbus server`" in (
            capsys.readouterr().err
        )
        assert run(server, "deployments") == 1
        assert "JetStream is not enabled" in capsys.readouterr().err


async def test_a_rollout_waits_for_the_new_version_then_retires_the_old(
    jetstream: inferbus.EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = StoreSettings(cache_dir=tmp_path / "cache", device="cpu")
    options = inferbus.ConnectOptions(servers=[jetstream.url], name="store-worker")
    async with inferbus.Worker([], options, store=settings):
        argv = ["deploy", str(TEST_MODELS / "add_v1"), "--wait", "30", "--servers", jetstream.url]
        assert await asyncio.to_thread(cli.main, argv) == 0
        assert "add v1 is served by 1 worker(s)" in capsys.readouterr().out
        argv[1:2] = [str(TEST_MODELS / "add_v2")]
        assert await asyncio.to_thread(cli.main, argv) == 0
        out = capsys.readouterr().out
        assert "add v2 is served by 1 worker(s)" in out
        assert "undeployed add.1: workers drain and unload them" in out
        rows = await asyncio.to_thread(deployed, jetstream, capsys, 1.0)
        assert [(r["version"], r["state"]) for r in rows] == [(2, "serving on 1 worker")]


def test_the_server_keeps_its_store_across_restarts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port, store_dir = str(free_port()), tmp_path / "js"
    url = f"nats://127.0.0.1:{port}"
    started: list[subprocess.Popen[str]] = []
    try:
        for attempt in range(2):
            server = start(started, "server", "--port", port, "--store-dir", str(store_dir))
            shown = read_until(server, "press Ctrl-C to stop")
            assert f"JetStream on: the model store is kept in {store_dir.resolve()}" in shown
            if attempt == 0:
                argv = ["deploy", str(TEST_MODELS / "add_v1"), "--wait", "0", "--servers", url]
                assert cli.main(argv) == 0
            else:
                capsys.readouterr()
                assert cli.main(["deployments", "--json", "--servers", url]) == 0
                assert [r["model"] for r in orjson.loads(capsys.readouterr().out)] == ["add"]
            server.send_signal(signal.SIGTERM)
            assert server.wait(10) == 0
        server = start(started, "server", "--port", port, "--no-jetstream")
        assert "JetStream off: no model store" in read_until(server, "press Ctrl-C to stop")
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
