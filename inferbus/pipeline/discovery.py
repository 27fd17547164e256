"""Who serves what: the workers' $SRV.INFO answers, gathered and read into typed records."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from inferbus.contract import (
    Signature,
    Tensors,
    error_from_reply,
    infer_subject,
    service_subject,
)
from inferbus.errors import BadInput, ModelNotFound, Unavailable
from inferbus.pipeline.nats_errors import nats_errors
from inferbus.store.records import DEMAND_SUBJECT

DESCRIBE_TTL_S: Final = 60.0  # a redeployed model is seen after this long


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model version as the cluster serves it, with the ids of the workers serving it."""

    name: str
    version: int
    signature: Signature
    engine: str
    devices: tuple[str, ...]
    max_batch_size: int
    workers: tuple[str, ...]


async def gather(
    client: NatsClient,
    subject: str,
    *,
    timeout: float = 0.5,
    until: Callable[[dict[str, Any]], bool] | None = None,
    count: int | None = None,
) -> list[dict[str, Any]]:
    """Every JSON reply to ``subject`` within ``timeout``, or up to the first that ``until``
    accepts, or up to ``count`` replies: one request, many responders."""
    inbox = client.new_inbox()
    replies: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def collect(msg: Msg) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            reply = orjson.loads(msg.data)
            if isinstance(reply, dict):
                replies.append(reply)
                if (until is not None and until(reply)) or len(replies) == count:
                    done.set()

    subscription = await client.subscribe(inbox, cb=collect)
    try:
        await client.publish(subject, b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
    finally:
        await subscription.unsubscribe()
    return replies


async def service_infos(client: NatsClient, **kwargs: Any) -> list[dict[str, Any]]:
    return await gather(client, service_subject("INFO"), **kwargs)


def _usable(meta: Any) -> bool:
    """Endpoint metadata that names a model, an integer version and a readable signature."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        return False
    if not str(meta.get("version", "")).isdigit():
        return False
    try:
        Signature.from_dict(orjson.loads(meta["signature"]))
        int(meta.get("max_batch_size", 1))
    except Exception:  # malformed JSON, unknown datatypes, missing keys: skip this endpoint
        return False
    return True


def models_from_infos(infos: list[dict[str, Any]]) -> list[ModelInfo]:
    """Merge the endpoints of every worker into one record per (model, version)."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for info in infos:
        for endpoint in info.get("endpoints") or []:
            meta = endpoint.get("metadata") or {}
            if not _usable(meta):  # another service, or a newer worker we cannot read
                continue
            key = (meta["model"], int(meta["version"]))
            entry = merged.setdefault(key, {"meta": meta, "devices": set(), "workers": set()})
            entry["devices"].add(meta.get("device", "?"))
            entry["workers"].add(info.get("id", "?"))
    return [
        ModelInfo(
            name=name,
            version=version,
            signature=Signature.from_dict(orjson.loads(entry["meta"]["signature"])),
            engine=entry["meta"].get("engine", "?"),
            devices=tuple(sorted(entry["devices"])),
            max_batch_size=int(entry["meta"].get("max_batch_size", 1)),
            workers=tuple(sorted(entry["workers"])),
        )
        for (name, version), entry in sorted(merged.items())
    ]


def serves(name: str, version: int | None) -> Callable[[dict[str, Any]], bool]:
    """A predicate for ``gather(until=...)``: this worker serves ``name`` (at ``version``)."""

    def check(info: dict[str, Any]) -> bool:
        for endpoint in info.get("endpoints") or []:
            meta = endpoint.get("metadata") or {}
            if meta.get("model") == name and version in (None, int(meta.get("version", 0))):
                return True
        return False

    return check


class Directory:
    """What the cluster serves, as the client sees it: models, and each one's signature cached
    for ``DESCRIBE_TTL_S``."""

    def __init__(self, nats: NatsClient) -> None:
        self.nats = nats
        self._described: dict[tuple[str, int | None], tuple[ModelInfo, float]] = {}

    async def models(
        self, *, timeout: float = 0.5, until: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[ModelInfo]:
        return models_from_infos(await service_infos(self.nats, timeout=timeout, until=until))

    async def describe(self, model: str, version: int | None = None) -> ModelInfo:
        key = (model, version)
        cached = self._described.get(key)
        if cached is not None and time.monotonic() - cached[1] < DESCRIBE_TTL_S:
            return cached[0]
        found = [
            m
            for m in await self.models(until=serves(model, version))
            if m.name == model and version in (None, m.version)
        ]
        if not found:
            subject = infer_subject(model, version)
            # On a shared bus discovery lists only the models granted to the caller.
            raise ModelNotFound(f"no worker serves {subject} (or it is not granted to you)",
                                model=model)  # fmt: skip
        self._described[key] = (found[-1], time.monotonic())
        return found[-1]

    async def demand(self, model: str, version: int | None, timeout: float) -> bool:
        """Ask the model store's workers to load a deployed model that no worker serves now:
        True once one serves it; False when no worker follows a store. A store that cannot
        (not deployed, no room) raises its coded error."""
        body = orjson.dumps({"model": model, "version": version})
        try:
            with nats_errors(DEMAND_SUBJECT, timeout, nobody=Unavailable):
                reply = await self.nats.request(DEMAND_SUBJECT, body, timeout=timeout)
        except Unavailable:
            return False
        error = error_from_reply(reply.headers, reply.data, model=model)
        if error is not None:
            raise error
        self._described.pop((model, version), None)
        return True

    async def named(self, model: str, version: int | None, inputs: Any) -> Tensors:
        """Tensors arrays as they are; a bare array goes to the model's only input."""
        if isinstance(inputs, Mapping):
            return inputs
        names = [spec.name for spec in (await self.describe(model, version)).signature.inputs]
        if len(names) != 1:
            raise BadInput(f"model has inputs {names}: pass a dict of named arrays", model=model)
        return {names[0]: np.asarray(inputs)}

    async def named_items(
        self, model: str, version: int | None, items: Iterable[Any]
    ) -> Iterator[Tensors]:
        """Items as named arrays, lazily; the input name is looked up once if needed."""
        iterator = iter(items)
        first = next(iterator, None)
        if first is None:
            return iter(())
        if isinstance(first, Mapping):
            return itertools.chain([first], iterator)
        (name,) = (await self.named(model, version, first)).keys()
        return ({name: np.asarray(item)} for item in itertools.chain([first], iterator))
