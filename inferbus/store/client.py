"""The model store's JetStream operations, on one NATS connection.

``Store`` holds two buckets (``records.py``): model archives in an Object Store, one object per
archive named by its sha256, and the desired deployments in a KV bucket (history 1). Uploads
stream the file; downloads go straight into a file (nats-py's in-memory ``get()`` is quadratic,
DESIGN.md) and are checked against their sha256 before anyone may unpack them.

Errors are translated here, once: ``Unavailable`` when JetStream cannot be reached or refuses
(try again later, or fix the server), ``ConfigError`` for content that must not be used
(a malformed record, an archive whose bytes do not hash to its name), ``ModelNotFound`` for
an archive the store does not hold.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, ObjectInfo, ObjectMeta, ObjectMetaOptions, StorageType
from nats.js.errors import (
    APIError,
    BadObjectMetaError,
    BucketNotFoundError,
    DigestMismatchError,
    KeyNotFoundError,
    NoStreamResponseError,
    ObjectNotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from nats.js.object_store import ObjectStore

from inferbus.contract import NAME_PATTERN
from inferbus.errors import ConfigError, ModelNotFound, Unavailable
from inferbus.store.archive import Archive
from inferbus.store.records import DEPLOYMENTS_BUCKET, FILES_BUCKET, Deployment, deployment_key

log = logging.getLogger("inferbus.store")

JETSTREAM_OFF: Final = (
    "JetStream is not enabled on this server: run `inferbus server` (JetStream is on by "
    "default) or see docs/CLUSTER.md"
)
NO_JETSTREAM_ACCOUNT: Final = (
    "JetStream is not enabled for this account: on a shared bus the model store is in the "
    "workers' account, which admins and workers use; users deploy through a worker "
    "(`inferbus deploy` does that for them; docs/SECURITY.md)"
)
_ACCOUNT_WITHOUT_JETSTREAM: Final = 10039  # JetStream's error code
CHUNK_BYTES: Final = 512 * 1024  # of an object; within any max_payload of 1 MiB or more
_DIGEST_PREFIX: Final = "SHA-256="
_SHA256: Final = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[int], object]
Malformed = Callable[[str, ConfigError], object]


@contextlib.contextmanager
def jetstream_errors(doing: str) -> Iterator[None]:
    """Translate what nats-py raises while ``doing`` something with JetStream."""
    try:
        yield
    except ServiceUnavailableError as exc:
        reason = (
            NO_JETSTREAM_ACCOUNT if exc.err_code == _ACCOUNT_WITHOUT_JETSTREAM else JETSTREAM_OFF
        )
        raise Unavailable(f"{doing}: {reason}") from None
    except NoStreamResponseError:
        raise Unavailable(f"{doing}: no JetStream stream took the message ({JETSTREAM_OFF}, "
                          "or the bucket was deleted)") from None  # fmt: skip
    except APIError as exc:
        raise Unavailable(f"{doing}: JetStream refused: {exc.description} "
                          f"(error {exc.err_code})") from exc  # fmt: skip
    except TimeoutError:  # nats-py's TimeoutError is one
        raise Unavailable(f"{doing}: JetStream did not answer in time (is this identity allowed "
                          "to? docs/SECURITY.md)") from None  # fmt: skip
    except NatsError as exc:
        raise Unavailable(f"{doing}: NATS: {exc}") from exc


async def jetstream_access(nats: NatsClient, *, timeout: float = 2.0) -> bool:
    """Whether this connection may use JetStream itself (True), or must deploy through a
    worker that follows the store (False: its account has none, or may not ask); ``Unavailable``
    when the server runs no JetStream at all."""
    try:
        await nats.jetstream(timeout=timeout).account_info()
    except ServiceUnavailableError as exc:
        if exc.err_code != _ACCOUNT_WITHOUT_JETSTREAM:
            raise Unavailable(JETSTREAM_OFF) from None
        return False
    except TimeoutError:  # a permission violation is never answered
        return False
    except NatsError as exc:
        raise Unavailable(f"asking JetStream: NATS: {exc}") from exc
    return True


class Store:
    """The model store: ``await Store.open(nats)``, then upload and download archives, put,
    delete, list and watch deployments. Keeps no state of its own beyond the buckets."""

    def __init__(self, files: ObjectStore, deployments: KeyValue, chunk_bytes: int) -> None:
        self._files = files
        self._deployments = deployments
        self._chunk_bytes = chunk_bytes

    @classmethod
    async def open(
        cls, nats: NatsClient, *, create: bool = True, replicas: int = 1, timeout: float = 5.0
    ) -> Store:
        """The store on ``nats``. The buckets are bound if they exist; else, with ``create``,
        made (file storage, ``replicas`` copies on a JetStream cluster), else ``Unavailable``.
        ``timeout``: for each JetStream API request."""
        js = nats.jetstream(timeout=timeout)
        with jetstream_errors("opening the model store"):
            files = await _bind_or_create(
                js.object_store(FILES_BUCKET),
                lambda: js.create_object_store(
                    FILES_BUCKET, description="inferbus model archives, named by sha256",
                    storage=StorageType.FILE, replicas=replicas,
                ),
                create,
            )  # fmt: skip
            deployments = await _bind_or_create(
                js.key_value(DEPLOYMENTS_BUCKET),
                lambda: js.create_key_value(
                    KeyValueConfig(
                        bucket=DEPLOYMENTS_BUCKET, history=1, storage=StorageType.FILE,
                        replicas=replicas, description="inferbus deployments: <model>.<version>",
                    )
                ),
                create,
            )  # fmt: skip
        chunk = max(4096, min(CHUNK_BYTES, nats.max_payload // 2))
        return cls(files, deployments, chunk)

    # --- archives -------------------------------------------------------------------------------

    async def has(self, sha256: str) -> bool:
        """Whether the store holds the archive named ``sha256``, whole."""
        info = await self._info(_checked_sha256(sha256))
        return info is not None and _hex(info.digest) == sha256

    async def upload(self, archive: Archive, *, progress: Progress | None = None) -> bool:
        """Put ``archive`` in the store, streamed from its file; False when the store holds it
        already (same size and digest: nothing is sent). ``progress(n)`` is called on the event
        loop after each ``n`` bytes sent."""
        existing = await self._info(_checked_sha256(archive.sha256))
        if existing is not None and (existing.size, _hex(existing.digest)) == (
            archive.size, archive.sha256,
        ):  # fmt: skip
            return False
        meta = ObjectMeta(
            name=archive.sha256, options=ObjectMetaOptions(max_chunk_size=self._chunk_bytes)
        )
        loop = asyncio.get_running_loop()
        with archive.path.open("rb") as file, jetstream_errors("uploading the archive"):
            reader = _Reader(file, progress, loop)
            info = await self._files.put(archive.sha256, reader, meta=meta)
        if _hex(info.digest) != archive.sha256:
            with contextlib.suppress(NatsError, TimeoutError):
                await self._files.delete(archive.sha256)
            raise ConfigError(f"{archive.path} changed while it was uploaded: pack it again")
        return True

    async def download(self, sha256: str, dest: Path, *, size: int | None = None) -> Path:
        """Write the archive named ``sha256`` into the file ``dest`` and check that its bytes
        hash to that name; return ``dest``. A mismatch (a tampered or corrupted object), or an
        object of another ``size`` than expected, raises ``ConfigError`` and leaves no file;
        ``ModelNotFound`` when the store has no such archive."""
        info = await self._info(_checked_sha256(sha256))
        if info is None:
            raise ModelNotFound(f"the model store holds no archive {sha256}")
        if size is not None and info.size != size:
            raise ConfigError(f"archive {sha256}: the store holds {info.size} bytes, the "
                              f"deployment says {size}: refused")  # fmt: skip
        try:
            with dest.open("wb") as file:
                writer = _HashingWriter(file, limit=info.size or 0)
                await self._get(sha256, writer)
            if writer.hexdigest() != sha256:
                raise ConfigError(f"archive {sha256}: its bytes hash to sha256 "
                                  f"{writer.hexdigest()}, not to its name: refused (a tampered "
                                  "or corrupted object)")  # fmt: skip
        except BaseException:
            _remove(dest)
            raise
        return dest

    async def _get(self, sha256: str, writer: _HashingWriter) -> None:
        with jetstream_errors("downloading the archive"):
            try:
                await self._files.get(sha256, writeinto=writer)
            except ObjectNotFoundError:
                raise ModelNotFound(f"the model store holds no archive {sha256}") from None
            except (DigestMismatchError, BadObjectMetaError) as exc:
                raise ConfigError(f"archive {sha256}: its chunks do not match its sha256 "
                                  f"digest: refused ({type(exc).__name__})") from None  # fmt: skip

    async def _info(self, sha256: str) -> ObjectInfo | None:
        with jetstream_errors("looking up the archive"):
            try:
                return await self._files.get_info(sha256)
            except ObjectNotFoundError:
                return None

    # --- deployments ----------------------------------------------------------------------------

    async def put(self, deployment: Deployment) -> int:
        """Record ``deployment`` (replacing any of the same model and version); its revision."""
        with jetstream_errors("writing the deployment"):
            return await self._deployments.put(deployment.key, deployment.to_json())

    async def get(self, model: str, version: int) -> Deployment | None:
        """The deployment of ``model`` ``version``, if any (a malformed one: ``ConfigError``)."""
        key = deployment_key(_checked_model(model), version)
        with jetstream_errors("reading the deployment"):
            try:
                entry = await self._deployments.get(key)
            except KeyNotFoundError:
                return None
        return parse_record(key, entry.value)

    async def delete(self, model: str, version: int | None = None) -> list[str]:
        """Delete the deployment of ``model`` ``version`` (None: of every version, malformed
        records included); the keys deleted (none: nothing was deployed). Workers then drain
        and unload them."""
        _checked_model(model)
        if version is not None:
            keys = [deployment_key(model, version)]
            keys = [key for key in keys if await self._recorded(key)]
        else:
            async with contextlib.aclosing(self._entries(ignore_deletes=True)) as entries:
                keys = [key async for key, _ in entries if _version_of(key, model) is not None]
        with jetstream_errors("deleting the deployment"):
            for key in keys:
                await self._deployments.delete(key)
        return keys

    async def _recorded(self, key: str) -> bool:
        with jetstream_errors("reading the deployment"):
            try:
                await self._deployments.get(key)
            except KeyNotFoundError:
                return False
        return True

    async def deployments(self, *, on_malformed: Malformed | None = None) -> list[Deployment]:
        """Every deployment, by model then version. A malformed record is skipped and
        reported: to ``on_malformed(key, error)``, else as a logged warning."""
        found: list[Deployment] = []
        async with contextlib.aclosing(self._entries(ignore_deletes=True)) as entries:
            async for key, value in entries:
                try:
                    found.append(parse_record(key, value))
                except ConfigError as exc:
                    (on_malformed or _log_malformed)(key, exc)
        return sorted(found, key=lambda d: (d.model, d.version))

    async def watch(self) -> AsyncGenerator[tuple[str, Deployment | None], None]:
        """``(key, deployment)`` for every deployment now recorded, then for each change as it
        happens, until the caller stops iterating (use ``contextlib.aclosing`` to stop early)
        or is cancelled. ``None``: no deployment under that key any more: deleted, or
        overwritten with a malformed record (logged). Keys are ``<model>.<version>``."""
        updates = self._entries(ignore_deletes=False, then_updates=True)
        async with contextlib.aclosing(updates):
            async for key, value in updates:
                deployment = None
                if value is not None:
                    try:
                        deployment = parse_record(key, value)
                    except ConfigError as exc:
                        _log_malformed(key, exc)
                yield key, deployment

    async def _entries(
        self, *, ignore_deletes: bool, then_updates: bool = False
    ) -> AsyncGenerator[tuple[str, bytes | None], None]:
        """(key, value; None when deleted) from a KV watcher: the current values, then, if
        ``then_updates``, every update."""
        with jetstream_errors("watching the deployments"):
            watcher = await self._deployments.watchall(ignore_deletes=ignore_deletes)
        try:
            async for entry in watcher:
                if entry is None:  # the current values are all delivered
                    if not then_updates:
                        return
                    continue
                deleted = entry.operation in (KV_DEL, KV_PURGE)
                yield entry.key, None if deleted else entry.value
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await watcher.stop()  # type: ignore[no-untyped-call]


def parse_record(key: str, value: bytes | None) -> Deployment:
    """The deployment a KV entry holds; ``ConfigError`` if malformed or not about ``key``."""
    deployment = Deployment.from_json(value or b"")
    if deployment.key != key:
        raise ConfigError(f"malformed deployment record: under {key!r} it describes "
                          f"{deployment.key!r}")  # fmt: skip
    return deployment


def _log_malformed(key: str, error: ConfigError) -> None:
    log.warning("model store: deployment %r skipped: %s", key, error)


async def _bind_or_create(
    binding: Awaitable[Any], creating: Callable[[], Awaitable[Any]], create: bool
) -> Any:
    try:
        return await binding
    except BucketNotFoundError:
        if not create:
            raise Unavailable("the model store's buckets do not exist yet: `inferbus deploy` "
                              "makes them") from None  # fmt: skip
    return await creating()


def _version_of(key: str, model: str) -> int | None:
    """The version in a deployment key of ``model`` (``<model>.<version>``), else None."""
    name, _, version = key.rpartition(".")
    return int(version) if name == model and version.isdigit() else None


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _checked_sha256(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise ConfigError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    return sha256


def _checked_model(model: str) -> str:
    if not NAME_PATTERN.fullmatch(model):
        raise ConfigError(f"model name {model!r} must match [A-Za-z0-9_-]+")
    return model


def _hex(digest: str | None) -> str | None:
    """An object's ``SHA-256=<urlsafe base64>`` digest as lowercase hex."""
    if not digest or not digest.upper().startswith(_DIGEST_PREFIX):
        return None
    try:
        return base64.urlsafe_b64decode(digest[len(_DIGEST_PREFIX) :]).hex()
    except ValueError:
        return None


class _Reader(io.BufferedIOBase):
    """A file as nats-py's ``put`` reads it (``readinto``, on a thread), telling ``progress``
    on the event loop how much it has read."""

    def __init__(
        self, file: IO[bytes], progress: Progress | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._file = file
        self._progress = progress
        self._loop = loop

    def readinto(self, buffer: Any) -> int:
        count = self._file.readinto(buffer)  # type: ignore[attr-defined]
        if count and self._progress is not None:
            self._loop.call_soon_threadsafe(self._progress, count)
        return int(count or 0)


class _HashingWriter(io.BufferedIOBase):
    """A file as nats-py's ``get(writeinto=)`` writes it (on a thread): hashed on the way, and
    never longer than ``limit`` bytes (what the object's metadata said)."""

    def __init__(self, file: IO[bytes], *, limit: int) -> None:
        self._file = file
        self._limit = limit
        self._written = 0
        self._digest = hashlib.sha256()

    def write(self, data: Any) -> int:
        self._written += len(data)
        if self._written > self._limit:
            raise ConfigError(f"the archive is longer than the {self._limit} bytes it declared")
        self._digest.update(data)
        return self._file.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
