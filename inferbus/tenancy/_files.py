"""Files only their owner may read: a state folder (0700) and the secrets in it (0600)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def private_folder(path: Path) -> Path:
    """Create ``path`` (and its parents) if needed; make it 0700 either way."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored when it exists
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 from the first byte, replacing it atomically:
    a reader (nats-server, a worker) sees the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)
