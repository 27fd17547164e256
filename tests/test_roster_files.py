"""What ``inferbus roster apply`` writes: the state folder, its keys and connection files, the
server settings and config text; and how a connection picks its identity. No server here
(tests/test_roster_server.py runs the configs)."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

from inferbus import cli
from inferbus.errors import ConfigError
from inferbus.natsserver import EmbeddedServer, ServerTLS, quote
from inferbus.pipeline.connection import ConnectOptions
from inferbus.roster import parse_roster
from inferbus.tenancy.connection_file import ConnectionFile, read_connection_file
from inferbus.tenancy.credentials import Identity
from inferbus.tenancy.keys import new_user_seed, public_key
from inferbus.tenancy.serverconfig import accounts_config
from inferbus.tenancy.settings import ServerSettings, server_settings
from inferbus.tenancy.state import apply_roster

ROSTER = """
[admins.teacher]
[workers.gpu1]
[users.alice]
[users.bob]
"""


def write_roster(folder: Path, text: str = ROSTER) -> Path:
    path = folder / "roster.toml"
    path.write_text(text)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_apply_writes_a_private_state_folder(tmp_path: Path) -> None:
    applied = apply_roster(write_roster(tmp_path), tmp_path / "state")
    state = tmp_path / "state"
    files = sorted(str(p.relative_to(state)) for p in state.rglob("*"))
    assert files == [
        ".gitignore", "accounts.conf", "admins", "admins/teacher.nk", "admins/teacher.toml",
        "nats-server.conf", "users", "users/alice.nk", "users/alice.toml", "users/bob.nk",
        "users/bob.toml", "workers", "workers/gpu1.nk", "workers/gpu1.toml",
    ]  # fmt: skip
    assert {mode(p) for p in state.rglob("*") if p.is_dir()} | {mode(state)} == {0o700}
    assert {mode(p) for p in state.rglob("*") if p.is_file()} == {0o600}
    assert (state / ".gitignore").read_text().splitlines()[-1] == "*"
    config = applied.config_path.read_text()
    for identity, key in applied.credentials.public_keys.items():
        seed = applied.credentials.seed(identity)
        assert public_key(seed) == key
        assert key in config
        assert seed not in config
        assert key in (state / "accounts.conf").read_text()
        handed = read_connection_file(applied.connection_path(identity))
        assert handed.nkey_seed == seed
        assert handed.servers == ("nats://127.0.0.1:4222",)


def test_keys_are_stable_and_follow_the_roster(tmp_path: Path) -> None:
    roster, state = write_roster(tmp_path), tmp_path / "state"
    first = apply_roster(roster, state).credentials
    assert set(first.added) == set(first.public_keys)
    assert first.removed == ()
    (state / "users" / "notes.txt").write_text("not ours")
    again = apply_roster(roster, state).credentials
    assert again.public_keys == first.public_keys
    assert (again.added, again.removed) == ((), ())

    # bob leaves, carol joins, alice becomes an admin: new keys for carol and for admin alice
    roster.write_text(ROSTER.replace("[users.bob]", "[users.carol]")
                      .replace("[users.alice]", "[admins.alice]"))  # fmt: skip
    changed = apply_roster(roster, state).credentials
    assert set(changed.added) == {Identity("user", "carol"), Identity("admin", "alice")}
    assert set(changed.removed) == {Identity("user", "bob"), Identity("user", "alice")}
    assert (
        changed.public_keys[Identity("admin", "alice")]
        != first.public_keys[Identity("user", "alice")]
    )
    for kept in (Identity("admin", "teacher"), Identity("worker", "gpu1")):
        assert changed.public_keys[kept] == first.public_keys[kept]
    assert sorted(p.name for p in (state / "users").iterdir()) == [
        "carol.nk", "carol.toml", "notes.txt"
    ]  # fmt: skip


def test_a_damaged_seed_is_reported_not_replaced(tmp_path: Path) -> None:
    roster, state = write_roster(tmp_path), tmp_path / "state"
    apply_roster(roster, state)
    damaged = state / "users" / "alice.nk"
    damaged.write_text("SUnot-a-seed\n")
    with pytest.raises(ConfigError, match=f"{damaged}: not an nkey user seed.*delete it"):
        apply_roster(roster, state)
    assert damaged.read_text() == "SUnot-a-seed\n"


def test_nothing_is_written_for_a_roster_that_fails(tmp_path: Path) -> None:
    for text, message in (
        ("[users.alice]\nrate = 0\n", "rate is a number"),
        ("[groups.class]\nmodels = ['x']\n", "names no admin, worker or user"),
        ('[users.alice]\n[server]\ntls_cert = "a\\"b"\ntls_key = "k"\n', "cannot be written"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_roster(write_roster(tmp_path, text), tmp_path / "state")
        assert not (tmp_path / "state").exists()


def test_server_settings_from_the_roster_then_the_flags(tmp_path: Path) -> None:
    table = {"host": "0.0.0.0", "port": 4333, "tls_cert": "certs/s.pem", "tls_key": "certs/k.pem",
             "tls_ca": "/etc/ca.pem", "url": ["tls://a:4333", "tls://b:4333"]}  # fmt: skip
    settings = server_settings(table, tmp_path)
    assert settings.tls == ServerTLS(tmp_path / "certs/s.pem", tmp_path / "certs/k.pem")
    assert settings.tls_ca == Path("/etc/ca.pem")
    assert settings.client_urls() == ["tls://a:4333", "tls://b:4333"]
    flagged = settings.overridden(host="127.0.0.1", port=None, tls_ca="ca.pem")
    assert (flagged.host, flagged.port) == ("127.0.0.1", 4333)
    assert flagged.tls_ca == Path("ca.pem").resolve()
    wildcard = ServerSettings(host="0.0.0.0", port=4333)
    assert wildcard.client_urls()[0].startswith("nats://")
    assert "0.0.0.0" not in str(wildcard.client_urls())


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"listen": "x"}, r"unknown keys \['listen'\]"),
        ({"port": 0}, "port must be 1-65535"),
        ({"port": "4222"}, "port must be 1-65535"),
        ({"tls_cert": "c.pem"}, "needs both tls_cert and tls_key"),
        ({"host": 1}, "host must be a non-empty string"),
        ({"max_payload": 0}, "max_payload"),
    ],
)
def test_bad_server_tables_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        server_settings(table, Path("."))


@pytest.mark.parametrize("value", ['a"b', "a\\b", "a\nb", "a\x00b"])
def test_config_strings_that_could_break_out_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="cannot be written into a nats-server config"):
        quote(value)
    with pytest.raises(ConfigError, match="cannot be written into a nats-server config"):
        EmbeddedServer(host=value, port=4222).config_text()
    assert quote("/a path/with spaces/cert.pem") == '"/a path/with spaces/cert.pem"'


def test_the_accounts_block_has_one_account_per_user_and_public_keys_only() -> None:
    roster = parse_roster({"admins": {"t": {}}, "workers": {"w": {}}, "users": {"u": {}}})
    keys = {i: public_key(new_user_seed()) for i in
            (Identity("admin", "t"), Identity("worker", "w"), Identity("user", "u"))}  # fmt: skip
    text = accounts_config(roster, keys)
    assert '"INFERBUS": {' in text
    assert '"u": {' in text
    assert text.count("allow_responses: true") == 1  # the worker's
    assert text.count("share: true") == 4  # infer, transfer, the model store, $SRV
    with pytest.raises(ConfigError, match="no public key"):
        accounts_config(roster, {})
    with pytest.raises(ConfigError, match="not an nkey user public key"):
        accounts_config(roster, dict.fromkeys(keys, "SUsecret"))


def test_a_connection_file_round_trips_and_hides_its_seed(tmp_path: Path) -> None:
    seed = new_user_seed()
    path = tmp_path / "alice.toml"
    path.write_text(ConnectionFile(("nats://a:1", "nats://b:2"), seed, "ca.pem").text("heading"))
    handed = read_connection_file(path)
    assert handed == ConnectionFile(("nats://a:1", "nats://b:2"), seed, str(tmp_path / "ca.pem"))
    options = ConnectOptions.from_file(path, name="app")
    assert (options.servers, options.nkey_seed, options.name) == (["nats://a:1", "nats://b:2"],
                                                                  seed, "app")  # fmt: skip
    assert options.identity() == {"nkeys_seed_str": seed}
    assert seed not in repr(options)
    assert seed not in repr(handed)
    path.write_text(f'servers = ["nats://a:1"]\nnkey_seed = "{seed}"\nuser = "x"\n')
    with pytest.raises(ConfigError, match=r"alice.toml: unknown keys \['user'\]") as refused:
        read_connection_file(path)
    path.write_text('servers = ["nats://a:1"]\nnkey_seed = "SUAAAA"\n')
    with pytest.raises(ConfigError, match="not an nkey user seed") as broken:
        read_connection_file(path)
    assert seed not in str(refused.value)
    assert "SUAAAA" not in str(broken.value)


def test_the_environment_names_an_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_file = tmp_path / "me.nk"
    seed_file.write_text(new_user_seed() + "\n")
    handed = tmp_path / "me.toml"
    handed.write_text(ConnectionFile(("nats://lab:4222",), new_user_seed(), "ca.pem").text("x"))
    for name in ("INFERBUS_SERVERS", "INFERBUS_CREDS", "INFERBUS_NKEY", "INFERBUS_CONNECTION"):
        monkeypatch.delenv(name, raising=False)
    assert ConnectOptions().identity() == {}
    monkeypatch.setenv("INFERBUS_NKEY", str(seed_file))
    assert ConnectOptions().identity() == {"nkeys_seed": str(seed_file)}
    monkeypatch.delenv("INFERBUS_NKEY")
    monkeypatch.setenv("INFERBUS_CONNECTION", str(handed))
    options = ConnectOptions()
    assert options.servers == ["nats://lab:4222"]
    assert options.tls_ca == str(tmp_path / "ca.pem")
    assert "nkeys_seed_str" in options.identity()
    monkeypatch.setenv("INFERBUS_SERVERS", "nats://other:4222")
    assert ConnectOptions().servers == ["nats://other:4222"]  # the narrower setting wins


def test_a_seed_file_that_is_not_one_fails_before_connecting(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.nk"
    wrong.write_text("-----BEGIN NATS USER JWT-----\n")
    with pytest.raises(ConfigError, match=r"wrong\.nk: not an nkey user seed"):
        ConnectOptions(nkey=str(wrong), creds=None).identity()
    with pytest.raises(ConfigError, match=r"missing\.nk: cannot read the nkey seed"):
        ConnectOptions(nkey=str(tmp_path / "missing.nk"), creds=None).identity()


def connection_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["models", *argv])


def test_an_identity_flag_replaces_the_environments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_file = tmp_path / "me.nk"
    seed_file.write_text(new_user_seed())
    handed = tmp_path / "me.toml"
    handed.write_text(ConnectionFile(("nats://lab:4222",), new_user_seed()).text("x"))
    monkeypatch.setenv("INFERBUS_CREDS", str(tmp_path / "env.creds"))
    by_flag = cli.connect_options(connection_args("--nkey", str(seed_file)), "test")
    assert by_flag.identity() == {"nkeys_seed": str(seed_file)}
    from_file = cli.connect_options(
        connection_args("--connection", str(handed), "--servers", "nats://x:1"), "test"
    )
    assert from_file.servers == ["nats://x:1"]
    assert "nkeys_seed_str" in from_file.identity()
    assert cli.connect_options(connection_args(), "test").identity() == {
        "user_credentials": str(tmp_path / "env.creds")
    }
    with pytest.raises(ConfigError, match="give one identity, not creds and nkey"):
        cli.connect_options(connection_args("--creds", "c", "--nkey", "n"), "test")
