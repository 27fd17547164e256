"""``inferbus roster check|apply``, ``inferbus server --roster``, ``inferbus up --roster`` and
``inferbus status --by-user``: the commands, run for real (servers and workers as processes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from inferbus import cli
from inferbus.natsserver import free_port
from tests.conftest import ROOT, TEST_MODELS

ROSTER = """
[admins.teacher]

[workers.gpu1]

[groups.class]
models = ["add", "ocr-*"]
rate = 20

[users.alice]
groups = ["class"]
rows_in_flight = 8

[users.bob]
"""


def write_roster(folder: Path, text: str = ROSTER) -> Path:
    path = folder / "roster.toml"
    path.write_text(f"{text}\n[server]\nport = {free_port()}\n")
    return path


def test_roster_check_summarises_a_good_roster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roster = write_roster(tmp_path)
    assert cli.main(["roster", "check", str(roster)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{roster}: OK",
        "admins:  teacher",
        "workers: gpu1",
        "groups:  class (1 member)",
        "users:   2",
        "  alice [class]: add, ocr-*; 20 req/s (burst 20), 8 rows in flight",
        "  bob: (no models); no quota",
    ]
    assert not (tmp_path / "roster.state").exists()  # checking writes nothing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[users.alice]\nrate = 0", "[users.alice]: rate is a number of requests per second > 0"),
        ("[users.INFERBUS]", "user name 'INFERBUS' is reserved"),
        ("[admins.alice]\n[users.alice]", "user 'alice' has the name of admin 'alice'"),
        ("[groups.class]", "the roster names no admin, worker or user: nobody could connect"),
        ("[users.alice]\n[server]\nports = 1", "[server]: unknown keys ['ports']"),
        ("[users.alice", "not valid TOML"),
    ],
)
def test_roster_check_refuses_a_bad_roster_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    roster = tmp_path / "roster.toml"
    roster.write_text(text)
    assert cli.main(["roster", "check", str(roster)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"inferbus: error: {roster}: ")
    assert message in captured.err
    assert "OK" not in captured.out


def test_roster_apply_prints_where_files_are_never_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roster, state = write_roster(tmp_path), tmp_path / "keys"
    assert cli.main(["roster", "apply", str(roster), "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert f"nats-server config: {state / 'nats-server.conf'}" in out
    assert f"user alice               {state / 'users' / 'alice.toml'}" in out
    assert "new keys for: admin teacher, worker gpu1, user alice, user bob" in out
    seeds = [p.read_text().strip() for p in state.rglob("*.nk")]
    assert len(seeds) == 4
    assert not any(seed in out for seed in seeds)
    assert cli.main(["roster", "apply", str(roster), "--state", str(state)]) == 0
    assert "new keys" not in capsys.readouterr().out  # the same keys again


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["roster"], ["check", "apply"]),
        (["roster", "check"], ["ROSTER", "Exits 1"]),
        (["roster", "apply"], ["--state", "never a key", "0700"]),
        (["server"], ["--roster", "--state", "--tls-cert", "--tls-key", "--tls-ca", "SIGHUP"]),
        (["up"], ["--roster", "--worker", "--tls-cert"]),
        (["worker"], ["--roster", "--nkey", "--connection", "INFERBUS_CONNECTION"]),
        (["status"], ["--by-user", "--connection"]),
    ],
)
def test_the_shared_bus_options_explain_themselves(
    command: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in expected:
        assert text in out, text


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """``inferbus`` processes started by the test; killed if the test did not stop them."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def start(processes: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "inferbus", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the log lines (stderr) in order with the prints
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    processes.append(process)
    return process


def read_until(process: subprocess.Popen[str], text: str) -> str:
    """The output up to the first line containing ``text`` (pytest's timeout bounds the wait)."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"exited ({process.wait()}) before {text!r}:\n{''.join(lines)}")


def can_connect(connection: Path, capsys: pytest.CaptureFixture[str]) -> bool:
    status = cli.main(["models", "--connection", str(connection), "--timeout", "0.1"])
    captured = capsys.readouterr()
    assert status == 0 or "Authorization Violation" in captured.err, captured.err
    return status == 0


def test_server_applies_roster_edits_and_sighup_without_a_restart(
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    roster = write_roster(tmp_path)
    users = tmp_path / "roster.state" / "users"
    server = start(processes, "server", "--roster", str(roster))
    read_until(server, "press Ctrl-C to stop")
    shutil.copy(users / "bob.toml", tmp_path / "bob.toml")
    shutil.copy(users / "alice.toml", tmp_path / "alice.toml")
    assert can_connect(users / "alice.toml", capsys)
    assert can_connect(users / "bob.toml", capsys)

    roster.write_text(roster.read_text().replace("[users.bob]", ""))  # found within a second
    assert "roster.toml applied, server reloaded: removed user bob" in read_until(server, "removed")
    assert not can_connect(tmp_path / "bob.toml", capsys)

    # SIGHUP applies the roster even when the file did not change: alice's deleted key is new
    (users / "alice.nk").unlink()
    server.send_signal(signal.SIGHUP)
    assert "server reloaded: added user alice" in read_until(server, "reloaded")
    assert not can_connect(tmp_path / "alice.toml", capsys)
    assert can_connect(users / "alice.toml", capsys)

    roster.write_text("[users.alice\n")  # broken: reported, the running roster kept
    assert "roster not applied; the server keeps the previous one" in read_until(
        server, "not applied"
    )
    assert can_connect(users / "alice.toml", capsys)
    server.send_signal(signal.SIGTERM)
    assert "nats-server stopped" in read_until(server, "stopped")
    assert server.wait(10) == 0


def test_up_serves_as_a_roster_worker_and_status_shows_each_users_share(
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    roster = write_roster(tmp_path)
    state = tmp_path / "roster.state"
    up = start(processes, "up", str(TEST_MODELS), "--model", "add", "--roster", str(roster))
    assert "connection files in" in read_until(up, "worker ready")
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 4), dtype=np.float32))
    infer = ["infer", "add", "--version", "1", "--input", f"x={x}", "--connection"]

    assert cli.main([*infer, str(state / "users" / "alice.toml")]) == 0
    assert "[[2. 2. 2. 2.]\n [2. 2. 2. 2.]]" in capsys.readouterr().out
    assert cli.main([*infer, str(state / "users" / "bob.toml")]) == 1
    assert "[403]" in capsys.readouterr().err

    status = ["status", "--by-user", "--once", "--json", "--connection"]
    assert cli.main([*status, str(state / "admins" / "teacher.toml")]) == 0
    seen = orjson.loads(capsys.readouterr().out)["add v1"]
    assert {row["user"]: (row["requests"], row["rows"], row["refused"]) for row in seen} == {
        "alice": (1, 2, 0),
        "bob": (0, 0, 1),
    }
    assert cli.main(["status", "--by-user", "--once", "--connection",
                     str(state / "users" / "alice.toml")]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "add v1" in table
    assert "alice" in table
    assert "bob" not in table
    up.send_signal(signal.SIGTERM)
    read_until(up, "worker stopped")
    assert up.wait(15) == 0


def test_roster_flags_without_a_roster_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["server", "--state", str(tmp_path)]) == 1
    assert "--state goes with --roster" in capsys.readouterr().err
    assert cli.main(["up", str(TEST_MODELS), "--worker", "gpu1"]) == 1
    assert "--worker goes with --roster" in capsys.readouterr().err
    roster = write_roster(tmp_path)
    assert cli.main(["up", str(TEST_MODELS), "--roster", str(roster), "--worker", "gpu9"]) == 1
    assert "names no worker 'gpu9'; it has ['gpu1']" in capsys.readouterr().err
