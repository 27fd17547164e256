"""The roster file: what it accepts, what it refuses (and says why), how grants and quotas
resolve. No server: ``inferbus.roster`` is pure."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import inferbus.roster
from inferbus.errors import ConfigError
from inferbus.roster import Quota, load_roster, parse_roster


def roster_of(text: str) -> inferbus.roster.Roster:
    return parse_roster(tomllib.loads(text))


def test_the_example_in_the_roster_docstring_parses_as_it_says() -> None:
    doc = inferbus.roster.__doc__ or ""
    block = re.search(r"::\n\n(.*?)\n\n\S", doc, flags=re.DOTALL)
    assert block is not None
    roster = roster_of("\n".join(line[4:] for line in block.group(1).splitlines()))
    assert roster.admins == ("teacher",)
    assert roster.workers == ("gpu1",)
    alice = roster.users["alice"]
    assert alice.groups == ("class",)
    assert alice.models == ("embeddings", "digits", "ocr-*")
    assert alice.quota == Quota(rate=50.0, burst=40, rows_in_flight=256)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[people.alice]", r"unknown sections \['people'\]"),
        ("[users.alice]\nmodel = ['x']", r"\[users.alice\]: unknown keys \['model'\]"),
        ("[groups.class]\nrates = 1", r"\[groups.class\]: unknown keys \['rates'\]"),
        ("users = 3", r"\[users\] holds tables"),
        ("[server]\n[users]\nalice = 1", r"\[users\] holds tables"),
    ],
)
def test_unknown_sections_and_keys_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        roster_of(text)


@pytest.mark.parametrize("name", ["al ice", "a.b", "ü", "a>", "*", '"quoted"'])
@pytest.mark.parametrize("kind", ["admins", "workers", "users"])
def test_names_are_nats_tokens(kind: str, name: str) -> None:
    with pytest.raises(ConfigError, match=r"must match \[A-Za-z0-9_-\]\+"):
        roster_of(f'[{kind}."{name}"]' if '"' not in name else f"[{kind}.'{name}']")


@pytest.mark.parametrize("name", ["INFERBUS", "inferbus", "SYS", "sys", "$G"])
@pytest.mark.parametrize("kind", ["admins", "workers", "users"])
def test_reserved_account_names_are_refused(kind: str, name: str) -> None:
    with pytest.raises(ConfigError, match=r"is reserved|must match"):
        roster_of(f'[{kind}."{name}"]')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[admins.alice]\n[users.alice]", "user 'alice' has the name of admin 'alice'"),
        ("[workers.gpu]\n[users.GPU]", "user 'GPU' has the name of worker 'gpu'"),
        ("[admins.Root]\n[workers.root]", "worker 'root' has the name of admin 'Root'"),
    ],
)
def test_one_name_names_one_identity_whatever_its_case(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        roster_of(text)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("rate = 0", "rate is a number of requests per second > 0"),
        ("rate = -1.5", "rate is a number"),
        ("rate = 'fast'", "rate is a number"),
        ("rate = true", "rate is a number"),
        ("burst = 0", "burst is an integer >= 1"),
        ("burst = 2.5", "burst is an integer >= 1"),
        ("rows_in_flight = 0", "rows_in_flight is an integer >= 1"),
        ("models = 'add'", "models is a list"),
        ("models = ['']", "models is a list"),
        ("groups = 'class'", "groups is a list of group names"),
        ("groups = ['nope']", r"no such groups \['nope'\]"),
    ],
)
def test_bad_values_are_refused_with_the_reason(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        roster_of(f"[users.alice]\n{table}")


ROSTER = """
[groups.class]
models = ["digits", "ocr-*"]
rate = 20
rows_in_flight = 64

[groups.lab]
models = ["*"]
rate = 5
burst = 10
rows_in_flight = 512

[users.alice]
groups = ["class"]
models = ["embeddings"]

[users.bob]
groups = ["class", "lab"]
rate = 2

[users.carol]

[users.dave]
groups = ["class"]
rate = 0.5
"""


@pytest.mark.parametrize(
    ("user", "quota"),
    [
        ("alice", Quota(rate=20.0, burst=20, rows_in_flight=64)),  # the group's, burst = rate
        ("bob", Quota(rate=2.0, burst=10, rows_in_flight=512)),  # own rate; most generous rest
        ("carol", Quota()),  # no groups, nothing of her own: no limit
        ("dave", Quota(rate=0.5, burst=1, rows_in_flight=64)),  # burst at least 1
    ],
)
def test_a_users_own_quota_wins_else_the_most_generous_group(user: str, quota: Quota) -> None:
    roster = roster_of(ROSTER)
    assert roster.quota(user) == quota
    assert roster.quota(user).limited == (user != "carol")
    assert roster.quota("stranger") == Quota()


@pytest.mark.parametrize(
    ("user", "model", "allowed"),
    [
        ("alice", "digits", True),
        ("alice", "embeddings", True),  # her own grant, beside the group's
        ("alice", "ocr-det", True),
        ("alice", "ocr", False),  # "ocr-*" needs the dash
        ("alice", "OCR-det", False),  # case matters, as in NATS subjects
        ("alice", "add", False),
        ("bob", "anything", True),  # "*" grants all
        ("carol", "digits", False),  # no grants at all
        ("stranger", "digits", False),  # not in the roster
    ],
)
def test_grants_are_names_or_patterns(user: str, model: str, allowed: bool) -> None:
    assert roster_of(ROSTER).allows(user, model) is allowed


def test_grants_keep_the_users_own_first_and_have_no_duplicates() -> None:
    roster = roster_of(ROSTER + '\n[users.erin]\ngroups = ["class", "lab"]\nmodels = ["digits"]')
    assert roster.users["erin"].models == ("digits", "ocr-*", "*")


def test_load_roster_names_the_file_in_every_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"{missing}: cannot read the roster"):
        load_roster(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[users.alice\n")
    with pytest.raises(ConfigError, match=f"{broken}: not valid TOML"):
        load_roster(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[users.alice]\nrate = 0\n")
    with pytest.raises(ConfigError, match=re.escape(f"{wrong}: [users.alice]: rate")):
        load_roster(wrong)


def test_the_server_table_is_kept_for_the_config_generator() -> None:
    server: dict[str, Any] = dict(roster_of('[server]\nhost = "0.0.0.0"\nport = 4333').server)
    assert server == {"host": "0.0.0.0", "port": 4333}
