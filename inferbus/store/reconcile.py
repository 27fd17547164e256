"""A worker's side of the model store: hold what is deployed, as far as this worker has room.

The reconciler watches the deployments (JetStream KV), and for each one this worker may run
(its device) and has room for (``max_models``, ``memory_mb``), fetches the archive, checks its
sha256, unpacks it (safely) into a cache, loads, warms up and subscribes it; a deployment
deleted is drained and unloaded. A deployment with ``replicas = N`` is held by at most N
workers: each claims one of N slots in a KV bucket of claims whose entries expire unless the
holder refreshes them, so a dead worker's slot frees itself.

When a client finds no worker for a deployed model it asks ``DEMAND_SUBJECT``; one reconciler
(a queue group) loads it, unloading the least recently used idle model when it has no room,
and answers once it serves it, or answers 503 with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyWrongLastSequenceError

from inferbus.contract import error_reply, requester_account
from inferbus.errors import ConfigError, Forbidden, ModelNotFound, RequestError, Unavailable
from inferbus.pipeline.lifecycle import cancel_and_wait
from inferbus.pipeline.policy import ADMIN
from inferbus.repository import load_model_config
from inferbus.store.archive import has_code, unpack
from inferbus.store.client import Store
from inferbus.store.records import CLAIMS_BUCKET, DEMAND_SUBJECT, Deployment, deployment_key
from inferbus.store.service import DeployService

if TYPE_CHECKING:
    from inferbus.pipeline.worker import Worker

CLAIM_TTL_S: Final = 30.0  # a claim not refreshed for this long frees its slot
TICK_S: Final = 1.0  # how often usage is sampled, claims refreshed, and the rest reconciled
DEMAND_QUEUE: Final = "inferbus-store"

log = logging.getLogger("inferbus.store")


def detect_device() -> str:
    """``cuda`` when an NVIDIA device node is visible, else ``cpu``."""
    return "cuda" if Path("/dev/nvidia0").exists() else "cpu"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """What a worker serving from the store may hold, and where it keeps the files."""

    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "inferbus" / "store")
    max_models: int = 4
    memory_mb: int | None = None  # a budget for the deployments' estimates; None: no limit
    device: str = field(default_factory=detect_device)
    allow_code: bool = False  # load folders that ship Python (engine_class): code, not data
    max_archive_bytes: int = 16 << 30
    max_files: int = 10_000

    def __post_init__(self) -> None:
        if self.max_models < 1:
            raise ConfigError("max_models must be >= 1")
        if self.memory_mb is not None and self.memory_mb < 1:
            raise ConfigError("memory_mb must be >= 1")


class _Counts(Protocol):
    @property
    def request_count(self) -> int: ...


class ServedModel(Protocol):
    """What the reconciler reads of a model version the worker serves."""

    @property
    def stats(self) -> _Counts: ...

    @property
    def idle(self) -> bool: ...


@dataclass(slots=True)
class _Held:
    deployment: Deployment
    served: ServedModel
    claim: str | None  # the claims-bucket key this worker holds for it
    seen_requests: int = 0
    last_used: float = field(default_factory=time.monotonic)


class Reconciler:
    """Keeps one worker's loaded models in line with the store."""

    def __init__(self, worker: Worker, settings: StoreSettings) -> None:
        self.worker = worker
        self.settings = settings
        self.desired: dict[str, Deployment] = {}
        self.held: dict[str, _Held] = {}
        self.refused: dict[str, str] = {}  # deployments this worker will not load, and why
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._store: Store | None = None
        self._claims: Any = None

    async def start(self) -> None:
        nats = self.worker.nats
        self._store = await Store.open(nats)
        self._claims = await nats.jetstream().create_key_value(
            KeyValueConfig(bucket=CLAIMS_BUCKET, history=1, ttl=CLAIM_TTL_S)
        )
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        await nats.subscribe(DEMAND_SUBJECT, queue=DEMAND_QUEUE, cb=self._on_demand)
        await DeployService(nats, self._store, self.worker.tenancy).start()
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._tick())]

    async def stop(self) -> None:
        """Stop following the store; the worker drains and closes what is loaded."""
        # Cancelled until they end: a cancel that lands as a JetStream reply does can be lost
        # inside nats-py (asyncio.wait_for on 3.11), and the tick would then run on for ever.
        await cancel_and_wait(self._tasks)
        for held in self.held.values():
            await self._release(held.claim)

    # --- following the store ------------------------------------------------------------------

    async def _watch(self) -> None:
        assert self._store is not None
        async for key, deployment in self._store.watch():
            if deployment is None:
                self.desired.pop(key, None)
                self.refused.pop(key, None)
            else:
                self.desired[key] = deployment
            self._kick.set()

    async def _tick(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the stop's cancel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._kick.wait()
            self._kick.clear()
            self._sample_usage()
            try:
                await self.reconcile()
            except Exception:  # the store or the bus had a bad moment: try again next tick
                log.exception("store: reconcile failed")

    def _sample_usage(self) -> None:
        now = time.monotonic()
        for held in self.held.values():
            count = held.served.stats.request_count
            if count != held.seen_requests:
                held.seen_requests, held.last_used = count, now

    async def reconcile(self) -> None:
        """Unload what is no longer deployed; load what is, while there is room (oldest
        deployment first); refresh this worker's claims."""
        async with self._lock:
            for key in [key for key in self.held if key not in self.desired]:
                await self._unload(key)
            for held in self.held.values():
                if held.claim is not None:
                    await self._claims.put(held.claim, self.worker.service.id.encode())
            for deployment in sorted(self.desired.values(), key=lambda d: d.deployed_at):
                if deployment.key in self.held or not self._may_run(deployment):
                    continue
                if self._fits(deployment):
                    with contextlib.suppress(Exception):  # logged and remembered in refused
                        await self._try_load(deployment)

    # --- placement ----------------------------------------------------------------------------

    def _may_run(self, deployment: Deployment) -> bool:
        if deployment.key in self.refused:
            return False
        return deployment.device is None or deployment.device == self.settings.device

    def _fits(self, deployment: Deployment) -> bool:
        if len(self.held) >= self.settings.max_models:
            return False
        budget = self.settings.memory_mb
        used = sum(held.deployment.memory_mb for held in self.held.values())
        return budget is None or used + deployment.memory_mb <= budget

    async def _claim(self, deployment: Deployment) -> str | None:
        """One of the deployment's ``replicas`` slots for this worker, or None when all are
        held (by live workers: claims expire)."""
        assert deployment.replicas is not None
        for slot in range(deployment.replicas):
            key = f"{deployment.model}.{deployment.version}.{slot}"
            try:
                await self._claims.create(key, self.worker.service.id.encode())
            except KeyWrongLastSequenceError:
                continue  # held by another worker
            return key
        return None

    async def _release(self, claim: str | None) -> None:
        if claim is not None and self._claims is not None:
            with contextlib.suppress(Exception):  # it expires anyway
                await self._claims.delete(claim)

    async def _try_load(self, deployment: Deployment) -> None:
        claim = None
        if deployment.replicas is not None:
            claim = await self._claim(deployment)
            if claim is None:
                return
        try:
            served = await self._load(deployment)
        except Exception as exc:
            await self._release(claim)
            if isinstance(exc, ConfigError):  # its content: refused here until redeployed
                self.refused[deployment.key] = str(exc)
            # anything else (the store or the bus) is tried again on a later tick
            log.error("store: %s v%d not loaded: %s", deployment.model, deployment.version, exc)
            raise
        self.held[deployment.key] = _Held(deployment, served, claim)

    async def _load(self, deployment: Deployment) -> ServedModel:
        started = time.monotonic()
        folder = await self._fetch(deployment)
        if not self.settings.allow_code and has_code(folder):
            raise ConfigError(
                "the model folder ships code (an engine_class .py, or a native library); this "
                "worker loads code only when started with --allow-code"
            )
        config = load_model_config(folder)
        config = dataclasses.replace(config, name=deployment.model, version=deployment.version)
        served = await self.worker.add_model(config)
        log.info("store: %s v%d serving, %.1f s after it was picked up", deployment.model,
                 deployment.version, time.monotonic() - started)  # fmt: skip
        return served

    async def _fetch(self, deployment: Deployment) -> Path:
        """The unpacked folder of a deployment's archive, from the cache or the store (its
        sha256 checked before anything is unpacked)."""
        assert self._store is not None
        folder = self.settings.cache_dir / deployment.sha256
        if folder.is_dir():
            return folder
        archive = self.settings.cache_dir / f".{deployment.sha256}.{os.getpid()}.tar"
        try:
            await self._store.download(deployment.sha256, archive, size=deployment.size)
            await asyncio.to_thread(unpack, archive, folder,
                                    max_bytes=self.settings.max_archive_bytes,
                                    max_files=self.settings.max_files)  # fmt: skip
        finally:
            archive.unlink(missing_ok=True)
        return folder

    async def _unload(self, key: str) -> None:
        held = self.held.pop(key)
        await self.worker.remove_model(held.deployment.model, held.deployment.version)
        await self._release(held.claim)
        log.info("store: %s v%d unloaded", held.deployment.model, held.deployment.version)

    # --- load on demand -------------------------------------------------------------------------

    async def _on_demand(self, msg: Msg) -> None:
        """A client found no worker for a model: load it here if it is deployed and this
        worker can make room; answer ``{"state": "ready"}`` or a coded error."""
        try:
            deployment = self._deployment_asked(msg.data, requester_account(msg.headers))
            async with self._lock:
                if deployment.key not in self.held:
                    await self._make_room_and_load(deployment)
            body, headers = orjson.dumps({"state": "ready"}), None
        except RequestError as exc:
            body, headers = error_reply(exc)
        except Exception as exc:  # the archive or the model failed to load: say why
            body, headers = error_reply(Unavailable(f"could not load it here: {exc}"))
        if msg.reply:
            await self.worker.nats.publish(msg.reply, body, headers=headers)

    def _deployment_asked(self, data: bytes, user: str | None) -> Deployment:
        try:
            asked = orjson.loads(data)
            model, version = str(asked["model"]), asked.get("version")
            version = None if version is None else int(version)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            raise Unavailable('a demand is JSON {"model": ..., "version": ...}') from None
        tenancy = self.worker.tenancy
        if tenancy is not None and not tenancy.may_see(user or ADMIN, model):
            # on a shared bus nobody makes workers load (and unload others for) models
            # they may not call
            raise Forbidden(f"model {model!r} is not granted to {user!r}")
        if version is not None:
            found = self.desired.get(deployment_key(model, version))
        else:
            versions = [d for d in self.desired.values() if d.model == model]
            found = max(versions, key=lambda d: d.version) if versions else None
        if found is None:
            raise ModelNotFound(f"{model} is not deployed in the store")
        if found.key in self.refused:
            raise Unavailable(f"this worker refused it: {self.refused[found.key]}")
        if not self._may_run(found):
            raise Unavailable(
                f"it needs a {found.device} worker; this one is {self.settings.device}"
            )
        return found

    async def _make_room_and_load(self, deployment: Deployment) -> None:
        """Unload the least recently used idle models until the deployment fits, then load it."""
        self._sample_usage()
        while not self._fits(deployment):
            idle = [h for h in self.held.values() if h.served.idle]
            if not idle:
                raise Unavailable(
                    f"no room on this worker: its {len(self.held)} loaded models are all busy"
                )
            await self._unload(min(idle, key=lambda h: h.last_used).deployment.key)
        await self._try_load(deployment)
        if deployment.key not in self.held:
            raise Unavailable(f"all {deployment.replicas} replicas are held by other workers")
