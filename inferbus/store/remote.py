"""Deploying and undeploying through a store worker's service (``service.py``): the way
for users of a shared bus, who have no JetStream of their own."""

from __future__ import annotations

from typing import Any

import orjson

from inferbus.errors import ModelNotFound, Unavailable
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.transport import Transport
from inferbus.store.archive import Archive
from inferbus.store.service import DEPLOY_SUBJECT, UNDEPLOY_SUBJECT, deploy_body


async def _exchange(options: ConnectOptions, subject: str, body: bytes, timeout: float) -> Any:
    transport = await Transport.open(options)
    try:
        data = await transport.exchange(subject, body, timeout)
    except ModelNotFound:  # "no responders": nobody serves the store on this bus
        raise Unavailable(
            "no worker follows the model store on this bus (start one with --store)"
        ) from None
    finally:
        await transport.close()
    return orjson.loads(bytes(data))


async def deploy_remote(options: ConnectOptions, archive: Archive, fields: dict[str, Any],
                        *, timeout: float = 600.0) -> dict[str, str]:  # fmt: skip
    """Send ``archive`` with its deployment ``fields`` (model, version, replicas, device,
    memory_mb) to a store worker; ``{"key", "sha256"}`` once it is in the store."""
    body = deploy_body(fields, archive.path.read_bytes())
    answer: dict[str, str] = await _exchange(options, DEPLOY_SUBJECT, body, timeout)
    return answer


async def undeploy_remote(options: ConnectOptions, model: str, version: int | None,
                          *, timeout: float = 30.0) -> list[str]:  # fmt: skip
    """Ask a store worker to delete deployments (yours, on a shared bus); the keys removed."""
    body = orjson.dumps({"model": model, "version": version})
    answer = await _exchange(options, UNDEPLOY_SUBJECT, body, timeout)
    return [str(key) for key in answer["removed"]]
