"""Deploying through a worker: how users of a shared bus put models in the store.

Users have no JetStream of their own (their accounts import only inferbus's services), so a
worker that follows the store also answers ``inferbus.store.deploy`` and
``inferbus.store.undeploy`` (queue group ``inferbus-store``). It identifies the sender by the
server-written account, checks the roster (model names under the user's prefix or granted,
the stored-bytes and deployment-count limits, Python code only when allowed), checks the
archive (its sha256, a safe unpack, a config that parses) and writes the store on the user's
behalf. On an open bus anyone may deploy this way; admins and open buses may also write
JetStream directly (``inferbus deploy`` does when it can).

Deploy request body: u32 LE N ‖ N bytes of JSON ``{"model", "version", "replicas",
"device", "memory_mb"}`` ‖ the archive (a chunked transfer when above ``max_payload``).
Reply: ``{"key": "<model>.<version>", "sha256": "..."}`` or an error reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import struct
import tempfile
from pathlib import Path
from typing import Any, Final

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from inferbus.contract import error_reply, requester_account
from inferbus.errors import BadInput, ConfigError, Forbidden, PayloadTooLarge, RequestError
from inferbus.pipeline.policy import ADMIN, Tenancy
from inferbus.pipeline.transfer import Receiver, TransferBudget, is_offer
from inferbus.repository import load_model_config
from inferbus.store.archive import Archive, has_code, unpack
from inferbus.store.client import Store
from inferbus.store.deploy import check_version_free
from inferbus.store.records import Deployment

DEPLOY_SUBJECT: Final = "inferbus.store.deploy"
UNDEPLOY_SUBJECT: Final = "inferbus.store.undeploy"
QUEUE: Final = "inferbus-store"
MAX_ARCHIVE_BYTES: Final = 4 << 30
_PREFIX = struct.Struct("<I")


def deploy_body(fields: dict[str, Any], archive: bytes) -> bytes:
    header = orjson.dumps(fields)
    return _PREFIX.pack(len(header)) + header + archive


def _split(body: bytes | bytearray) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(body)
    if len(view) < 4:
        raise BadInput("a deploy request starts with a u32 length and JSON")
    (size,) = _PREFIX.unpack_from(view)
    try:
        fields = orjson.loads(view[4 : 4 + size])
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"deploy request JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise BadInput("deploy request JSON must be an object")
    return fields, view[4 + size :]


class DeployService:
    """Answers deploy and undeploy requests for one worker that follows the store."""

    def __init__(self, nats: NatsClient, store: Store, tenancy: Tenancy | None) -> None:
        self.nats = nats
        self.store = store
        self.tenancy = tenancy
        self._budget = TransferBudget(2 * MAX_ARCHIVE_BYTES, share=0.5)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.nats.subscribe(DEPLOY_SUBJECT, queue=QUEUE, cb=self._on_deploy)
        await self.nats.subscribe(UNDEPLOY_SUBJECT, queue=QUEUE, cb=self._on_undeploy)

    async def _on_deploy(self, msg: Msg) -> None:
        user = requester_account(msg.headers) or ADMIN
        if not is_offer(msg):
            await self._answer(msg.reply, self._deploy(user, msg.data))
            return
        try:
            receiver = await Receiver.accept(self.nats, msg, MAX_ARCHIVE_BYTES,
                                             budget=self._budget, owner=user or None)  # fmt: skip
        except RequestError:  # refused, and the sender told
            return
        task = asyncio.create_task(self._receive(receiver, user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _receive(self, receiver: Receiver, user: str) -> None:
        try:
            body = await receiver.wait()
        except RequestError:
            return
        await self._answer(receiver.reply, self._deploy(user, body))

    async def _answer(self, reply: str | None, work: Any) -> None:
        try:
            result = await work
            body, headers = orjson.dumps(result), None
        except RequestError as exc:
            body, headers = error_reply(exc)
        except ConfigError as exc:  # a bad folder or record: the deployer's to fix
            body, headers = error_reply(BadInput(str(exc)))
        if reply:
            await self.nats.publish(reply, body, headers=headers)

    async def _deploy(self, user: str, body: bytes | bytearray) -> dict[str, str]:
        fields, archive = _split(body)
        if not archive:
            raise BadInput("the deploy request carries no archive")
        sha256 = hashlib.sha256(archive).hexdigest()
        deployment = Deployment(
            model=str(fields.get("model", "")), version=int(fields.get("version", 1)),
            sha256=sha256, size=len(archive), replicas=fields.get("replicas"),
            device=fields.get("device"), memory_mb=int(fields.get("memory_mb", 0)), owner=user,
        )  # fmt: skip
        await self._check_rights(user, deployment)
        await check_version_free(self.store, deployment)
        with tempfile.TemporaryDirectory(prefix="inferbus-deploy-") as scratch:
            path = Path(scratch) / "model.tar"
            await asyncio.to_thread(path.write_bytes, archive)
            limits = {"max_bytes": MAX_ARCHIVE_BYTES, "max_files": 10_000}
            folder = await asyncio.to_thread(unpack, path, Path(scratch) / "model", **limits)
            code = has_code(folder)
            if code and not self._may_ship_code(user):
                raise Forbidden(f"the folder ships Python code; the roster does not let "
                                f"{user!r} deploy code")  # fmt: skip
            load_model_config(folder)  # a config that parses, or the deployer hears why
            await self.store.upload(Archive(path, sha256, len(archive), code))
        stored = dataclasses.replace(deployment, has_code=code)
        await self.store.put(stored)
        return {"key": stored.key, "sha256": sha256}

    def _may_ship_code(self, user: str) -> bool:
        if self.tenancy is None or user == ADMIN:
            return True
        known = self.tenancy.roster.user(user)
        return known is not None and known.deploy.code

    async def _check_rights(self, user: str, deployment: Deployment) -> None:
        if self.tenancy is None or user == ADMIN:
            return
        known = self.tenancy.roster.user(user)
        if known is None or not known.may_deploy(deployment.model):
            raise Forbidden(f"{user!r} may deploy only models named {user}-... (or granted)")
        mine = [d for d in await self.store.deployments() if d.owner == user]
        others = [d for d in mine if d.key != deployment.key]
        if len(others) >= known.deploy.deployments:
            raise Forbidden(f"{user!r} has {len(others)} deployments; the limit is "
                            f"{known.deploy.deployments}: undeploy one first")  # fmt: skip
        stored = sum(d.size for d in others) + deployment.size
        if stored > known.deploy.stored_mb << 20:
            raise PayloadTooLarge(f"{user!r} would keep {stored >> 20} MiB in the store; the "
                                  f"limit is {known.deploy.stored_mb} MiB")  # fmt: skip

    async def _on_undeploy(self, msg: Msg) -> None:
        user = requester_account(msg.headers) or ADMIN
        await self._answer(msg.reply, self._undeploy(user, msg.data))

    async def _undeploy(self, user: str, data: bytes) -> dict[str, list[str]]:
        try:
            asked = orjson.loads(data)
            model, version = str(asked["model"]), asked.get("version")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise BadInput('an undeploy request is JSON {"model": ..., "version": ...}') from None
        if user != ADMIN and self.tenancy is not None:
            owned = [d for d in await self.store.deployments() if d.model == model]
            if any(d.owner != user for d in owned):
                raise Forbidden(f"{model} was deployed by someone else")
        removed = await self.store.delete(model, None if version is None else int(version))
        return {"removed": removed}
