"""Model archives: the same folder packs to the same bytes, and unpacking refuses every hostile
tar (crafted here with the tarfile module) before it writes a byte."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from inferbus.errors import ConfigError
from inferbus.store.archive import code_files, file_sha256, has_code, pack, unpack
from tests.conftest import TEST_MODELS

LIMITS = {"max_bytes": 1 << 20, "max_files": 16}


def model_folder(tmp_path: Path, name: str = "m") -> Path:
    folder = tmp_path / name
    shutil.copytree(TEST_MODELS / "add_v1", folder)
    return folder


def test_the_same_folder_packs_to_the_same_sha256(tmp_path: Path) -> None:
    first = pack(model_folder(tmp_path, "a"), tmp_path / "a.tar")
    copy = model_folder(tmp_path, "b")
    os.utime(copy / "model.onnx", (1, 1))  # times, modes and owners do not matter
    (copy / "config.toml").chmod(0o600)
    (copy / ".plans").mkdir()  # nor what stays behind
    (copy / ".plans" / "x.plan").write_bytes(b"plan")
    (copy / ".DS_Store").write_bytes(b"junk")
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"bytecode")
    second = pack(copy, tmp_path / "b.tar")
    assert (first.sha256, first.size) == (second.sha256, second.size)
    assert first.sha256 == file_sha256(first.path)
    assert first.size == first.path.stat().st_size
    with tarfile.open(first.path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["config.toml", "model.onnx"]
    assert {(m.mode, m.mtime, m.uid, m.gid, m.type) for m in members} == {
        (0o644, 0, 0, 0, tarfile.REGTYPE)
    }
    (copy / "model.onnx").write_bytes(b"other weights")
    assert pack(copy, tmp_path / "c.tar").sha256 != first.sha256


def test_a_folder_round_trips_through_an_archive(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    (folder / "weights" / "deep").mkdir(parents=True)
    (folder / "weights" / "deep" / "w.bin").write_bytes(os.urandom(5000))
    (folder / "weights" / "a-b.txt").write_text("é")
    archive = pack(folder, tmp_path / "m.tar")
    out = unpack(archive.path, tmp_path / "out", **LIMITS)
    shipped = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert not archive.has_code
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_links_inside_the_folder_are_shipped_as_files_links_out_are_refused(
    tmp_path: Path,
) -> None:
    folder = model_folder(tmp_path)
    (folder / "alias.onnx").symlink_to("model.onnx")
    archive = pack(folder, tmp_path / "m.tar")
    with tarfile.open(archive.path) as tar:
        alias = tar.getmember("alias.onnx")
    assert alias.isreg()
    assert alias.size == (folder / "model.onnx").stat().st_size
    (tmp_path / "secret").write_text("key")
    (folder / "escape").symlink_to(tmp_path / "secret")
    with pytest.raises(ConfigError, match="outside the model folder"):
        pack(folder, tmp_path / "m.tar")
    (folder / "escape").unlink()
    (folder / "dangling").symlink_to(folder / "nothing")
    with pytest.raises(ConfigError, match="cannot pack"):
        pack(folder, tmp_path / "m.tar")
    (folder / "dangling").unlink()
    (folder / "sub").mkdir()
    (folder / "sub" / "loop").symlink_to(folder)
    with pytest.raises(ConfigError, match="a loop"):
        pack(folder, tmp_path / "m.tar")


def test_a_pipe_in_the_folder_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    os.mkfifo(folder / "pipe")
    with pytest.raises(ConfigError, match="not a regular file"):
        pack(folder, tmp_path / "m.tar")


def test_code_is_detected(tmp_path: Path) -> None:
    assert not has_code(TEST_MODELS / "add_v1")
    assert code_files(TEST_MODELS / "failing") == ["failing_engine.py"]
    assert pack(TEST_MODELS / "failing", tmp_path / "f.tar").has_code
    folder = model_folder(tmp_path)
    (folder / "lib").mkdir()
    (folder / "lib" / "ops.so").write_bytes(b"\x7fELF")
    assert code_files(folder) == ["lib/ops.so"]
    assert pack(folder, tmp_path / "m.tar").has_code
    other = model_folder(tmp_path, "n")  # the engine_class file counts even before it exists
    with (other / "config.toml").open("a") as config:
        config.write('engine_class = "mine.py:Engine"\n')
    assert code_files(other) == ["mine.py"]


# --- hostile archives ----------------------------------------------------------------------------


def hostile(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def good() -> tuple[tarfile.TarInfo, bytes]:
    return member("config.toml"), b"max_batch_size = 1\n"


Case = Callable[[], list[tuple[tarfile.TarInfo, bytes]]]
HOSTILE: dict[str, tuple[Case, str]] = {
    "dot-dot": (lambda: [good(), (member("../evil"), b"x")], "'..' part"),
    "nested dot-dot": (lambda: [(member("a/../../evil"), b"x")], "'..' part"),
    "absolute": (lambda: [(member("/etc/evil"), b"x")], "absolute path"),
    "symlink": (lambda: [(member("l", tarfile.SYMTYPE, linkname="/etc/passwd"), b"")], "link"),
    "hard link": (
        lambda: [good(), (member("h", tarfile.LNKTYPE, linkname="config.toml"), b"")],
        "not a regular file",
    ),
    "device": (lambda: [(member("d", tarfile.CHRTYPE, devmajor=1, devminor=3), b"")], "device"),
    "fifo": (lambda: [(member("p", tarfile.FIFOTYPE), b"")], "not a regular file"),
    "folder": (lambda: [(member("sub", tarfile.DIRTYPE), b"")], "not a regular file"),
    "dotfile": (lambda: [(member(".plans/x.plan"), b"plan")], "dotfile"),
    "backslash": (lambda: [(member("a\\b"), b"x")], "backslashes"),
    "control": (lambda: [(member("a\nb"), b"x")], "control characters"),
    "empty part": (lambda: [(member("a//b"), b"x")], "empty"),
    "twice": (lambda: [good(), good()], "appears twice"),
    "file and folder": (lambda: [(member("a"), b"x"), (member("a/b"), b"y")], "under a file"),
    "folder and file": (lambda: [(member("a/b"), b"x"), (member("a"), b"y")], "appears twice"),
    "long": (lambda: [(member("x" * 300), b"x")], "too long"),
    "oversize": (
        lambda: [good(), (member("big"), b"x" * (LIMITS["max_bytes"] + 1))],
        "more than 1,048,576 bytes",
    ),
    "too many": (
        lambda: [(member(f"f{i}"), b"") for i in range(LIMITS["max_files"] + 1)],
        "more than 16 files",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_before_anything_is_written(tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    archive = hostile(tmp_path / "evil.tar", *make())
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    with pytest.raises(ConfigError, match=message):
        unpack(archive, dest, **LIMITS)
    assert list(dest.parent.iterdir()) == []  # neither dest nor a half-written staging folder
    assert not (tmp_path / "evil").exists()


def test_an_archive_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    archive = tmp_path / "huge.tar"
    archive.write_bytes(b"\0" * (LIMITS["max_bytes"] * 2))
    with pytest.raises(ConfigError, match="larger than"):
        unpack(archive, tmp_path / "out", **LIMITS)


@pytest.mark.parametrize("data", [b"not a tar at all" * 100, b"", b"\x1f\x8b compressed"])
def test_what_is_not_a_plain_tar_is_refused(tmp_path: Path, data: bytes) -> None:
    archive = tmp_path / "x.tar"
    archive.write_bytes(data)
    with pytest.raises(ConfigError, match=r"not a valid tar|holds no file"):
        unpack(archive, tmp_path / "out", **LIMITS)
    assert not (tmp_path / "out").exists()


def test_a_compressed_tar_is_refused(tmp_path: Path) -> None:
    info, data = good()
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ConfigError, match="not a valid tar"):
        unpack(tmp_path / "x.tar.gz", tmp_path / "out", **LIMITS)


def test_unpack_never_replaces_a_folder(tmp_path: Path) -> None:
    archive = pack(TEST_MODELS / "add_v1", tmp_path / "m.tar")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_text("keep")
    with pytest.raises(ConfigError, match="exists already"):
        unpack(archive.path, tmp_path / "out", **LIMITS)
    assert (tmp_path / "out" / "mine").read_text() == "keep"
