"""Model archives: a model folder as one deterministic, uncompressed tar, and its safe unpacking.

``pack`` makes the same bytes (so the same sha256, the archive's name in the store) from the
same files wherever it runs: paths sorted, regular files only, mode 0644, mtime 0, owner 0,
no links or devices. Dotfiles and dot-folders (``.plans/`` TensorRT caches, ``.git``) and
``__pycache__`` stay behind: a worker builds its own plans and compiles its own bytecode.

``unpack`` trusts nothing in the archive: it reads every header first and refuses anything
but plain relative file names (no absolute paths, ``..``, links, devices, dotfiles) and
anything over the size or file-count limits, all before the first byte is written; then it
writes into a temporary folder beside ``dest`` and renames it into place. Nothing is ever
unpickled or imported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Final

from inferbus.errors import ConfigError
from inferbus.repository import CONFIG_FILE

#: files that are code, not data: a folder shipping any of them needs ``--allow-code``
CODE_SUFFIXES: Final = frozenset({".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll"})
SKIPPED_FOLDERS: Final = frozenset({"__pycache__"})
MAX_NAME_BYTES: Final = 1024  # a whole relative path
MAX_PART_BYTES: Final = 255  # one path component
_CHUNK: Final = 1 << 20
_REGULAR: Final = (tarfile.REGTYPE, tarfile.AREGTYPE)


@dataclass(frozen=True, slots=True)
class Archive:
    """A packed model folder: the tar file, its sha256 (hex) and size, and whether it ships
    code (an ``engine_class`` .py file, or any Python or native library file)."""

    path: Path
    sha256: str
    size: int
    has_code: bool


def file_sha256(path: Path) -> str:
    """The sha256 (lowercase hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_code(name: str) -> bool:
    """Whether an archive member or file name is code (``CODE_SUFFIXES``)."""
    return PurePosixPath(name).suffix.lower() in CODE_SUFFIXES


def code_files(folder: Path) -> list[str]:
    """The files of a model folder that are code: those ``is_code`` names among the files
    ``pack`` would ship, and the .py file its config's ``engine_class`` names, if any."""
    found = [name for name, _ in shipped_files(folder) if is_code(name)]
    target = _engine_class_file(folder / CONFIG_FILE)
    return found if target is None or target in found else [*found, target]


def has_code(folder: Path) -> bool:
    """Whether a model folder (to deploy, or unpacked) ships code (``code_files``)."""
    return bool(code_files(folder))


def _engine_class_file(config: Path) -> str | None:
    try:
        raw = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # load_model_config says what is wrong with it
    target = raw.get("engine_class")
    if not isinstance(target, str) or not target.partition(":")[0].endswith(".py"):
        return None
    return target.partition(":")[0]


# --- pack ---------------------------------------------------------------------------------------


def pack(folder: Path, dest: Path) -> Archive:
    """Write ``folder`` as a deterministic tar to ``dest`` (a file path, replaced if there);
    ``ConfigError`` for a folder that cannot be shipped (a link out of it, a device, a name an
    archive may not hold). Blocking: run it off the event loop."""
    files = shipped_files(folder)
    if not files:
        raise ConfigError(f"{folder} holds no file to deploy")
    try:
        with (
            dest.open("wb") as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar,
        ):
            for name, path in files:
                _add(tar, name, path)
    except OSError as exc:
        raise ConfigError(f"cannot pack {folder}: {exc}") from exc
    code = any(is_code(name) for name, _ in files) or _engine_class_file(folder / CONFIG_FILE)
    return Archive(dest, file_sha256(dest), dest.stat().st_size, bool(code))


def shipped_files(folder: Path) -> list[tuple[str, Path]]:
    """(archive name, real path) of each file ``pack`` ships from ``folder``, sorted by name;
    ``ConfigError`` for a folder that cannot be shipped."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    root = folder.resolve()
    try:
        return sorted(_files(root, root, PurePosixPath(), (root,)), key=lambda item: item[0])
    except OSError as exc:  # a dangling link, a folder we may not read
        raise ConfigError(f"cannot pack {folder}: {exc}") from exc


def _files(
    root: Path, folder: Path, prefix: PurePosixPath, walking: tuple[Path, ...]
) -> Iterator[tuple[str, Path]]:
    """(archive name, real path) of every file to ship under ``folder``. A link is shipped as
    what it points to, which must lie inside the model folder ``root``; ``walking``: the
    folders being walked, to refuse a link back into one of them (a loop)."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in SKIPPED_FOLDERS:
            continue
        name = prefix / entry.name
        target = entry.resolve() if entry.is_symlink() else entry
        if target != root and root not in target.parents:
            raise ConfigError(f"{entry} links to {target}, outside the model folder")
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            if target in walking:
                raise ConfigError(f"{entry} links back into a folder that holds it (a loop)")
            yield from _files(root, target, name, (*walking, target))
        elif stat.S_ISREG(mode):
            check_name(name.as_posix())
            yield name.as_posix(), target
        else:
            raise ConfigError(f"{entry} is not a regular file (a device, socket or pipe)")


def _add(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    with path.open("rb") as data:
        tar.addfile(info, data)


# --- unpack -------------------------------------------------------------------------------------


def check_name(name: str) -> PurePosixPath:
    """A member name an archive may hold: relative, printable, no ``..``, ``.`` or empty part,
    no dotfile, no backslash, within the length limits. ``ConfigError`` otherwise."""
    path = PurePosixPath(name)
    problem = None
    if not name or not name.isprintable() or "\\" in name:
        problem = "is empty or holds control characters or backslashes"
    elif name.startswith("/") or path.is_absolute():
        problem = "is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "has an empty, '.' or '..' part"
    elif any(part.startswith(".") for part in path.parts):
        problem = "is a dotfile or inside a dot-folder"
    elif len(name.encode()) > MAX_NAME_BYTES or any(
        len(part.encode()) > MAX_PART_BYTES for part in path.parts
    ):
        problem = "is too long"
    if problem is not None:
        raise ConfigError(f"archive member {name!r} {problem}")
    return path


def unpack(path: Path, dest: Path, *, max_bytes: int, max_files: int) -> Path:
    """Extract the archive at ``path`` into the new folder ``dest``; return ``dest``.

    Every member is checked before anything is written: regular files only, names as
    ``check_name`` allows, no name twice or both a file and a folder, at most ``max_files``
    files of at most ``max_bytes`` together. The files are written (mode 0644) into a
    temporary folder beside ``dest``, which is then renamed to ``dest``: ``dest`` appears
    whole or not at all. ``ConfigError`` for a refused archive, or if ``dest`` exists.
    Blocking: run it off the event loop."""
    if dest.exists():
        raise ConfigError(f"{dest} exists already: unpack into a new folder")
    allowance = max_bytes + (max_files + 1) * 4096 + 2 * tarfile.RECORDSIZE  # headers, padding
    if path.stat().st_size > allowance:
        raise ConfigError(f"archive {path.name} is larger than the {max_bytes:,}-byte limit")
    try:
        with tarfile.open(path, mode="r:", encoding="utf-8", errors="strict") as tar:
            members = _checked_members(tar, max_bytes=max_bytes, max_files=max_files)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                _write(tar, members, staging)
                staging.rename(dest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except (tarfile.TarError, UnicodeError, EOFError) as exc:
        raise ConfigError(f"archive {path.name} is not a valid tar: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot unpack {path.name} into {dest}: {exc}") from exc
    return dest


def _checked_members(
    tar: tarfile.TarFile, *, max_bytes: int, max_files: int
) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    total = 0
    for member in _each(tar):
        if len(members) >= max_files:
            raise ConfigError(f"the archive holds more than {max_files:,} files")
        if member.type not in _REGULAR:
            raise ConfigError(f"archive member {member.name!r} is not a regular file "
                              f"(type {member.type!r}: a link, folder or device)")  # fmt: skip
        check_name(member.name)
        total += member.size
        if total > max_bytes:
            raise ConfigError(f"the archive's files hold more than {max_bytes:,} bytes")
        members.append(member)
    _check_layout(member.name for member in members)
    if not members:
        raise ConfigError("the archive holds no file")
    return members


def _each(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one header at a time (``getmembers`` would read them all before we count)."""
    while (member := tar.next()) is not None:
        yield member


def _check_layout(names: Iterable[str]) -> None:
    files: set[str] = set()
    folders: set[str] = set()
    for name in names:
        if name in files or name in folders:
            raise ConfigError(f"archive member {name!r} appears twice, or as a file and a folder")
        files.add(name)
        parents = {parent.as_posix() for parent in PurePosixPath(name).parents} - {"."}
        if parents & files:
            raise ConfigError(f"archive member {name!r} lies under a file of the same name")
        folders |= parents


def _write(tar: tarfile.TarFile, members: list[tarfile.TarInfo], root: Path) -> None:
    for member in members:
        target = root.joinpath(*PurePosixPath(member.name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is None:  # only regular files reach here; tarfile gives them a reader
            raise ConfigError(f"archive member {member.name!r} has no data")
        with source, _create(target) as out:
            shutil.copyfileobj(source, out, _CHUNK)


def _create(path: Path) -> IO[bytes]:
    """A new file (never an existing one, nor through a link), mode 0644."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")
