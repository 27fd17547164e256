"""What ``inferbus deploy`` does, step by step, apart from its command line: check a model folder
here, pack and upload it, record the deployment, and roll it out (wait until a worker serves
it, then undeploy the model's other versions).

The one trust decision is code. A folder whose config names an ``engine_class`` in a .py file
of its own, or that ships any Python or native library file, is code that every worker
loading it would run: it is refused unless the deployer says ``allow_code`` (and workers load
it only when they were started to allow code, too). A folder of weights and a config is data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson
from nats.aio.client import Client as NatsClient

from inferbus.contract import error_from_reply
from inferbus.errors import ConfigError, RequestError, Unavailable
from inferbus.pipeline.client import Client
from inferbus.pipeline.nats_errors import nats_errors
from inferbus.repository import ModelConfig
from inferbus.store.archive import Archive
from inferbus.store.client import Store
from inferbus.store.records import DEMAND_SUBJECT, Deployment

MIB: Final = 1024 * 1024
POLL_S: Final = 0.5  # discovery gathers answers this long each time
DEMAND_AFTER_S: Final = 5.0  # not served by then: ask the store's workers to load it now
SAY_EVERY_S: Final = 5.0
_OPEN_ACCOUNT: Final = "$G"  # nats-server's account when there are no accounts

Say = Callable[[str], object]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a deployment may run, and how many workers should hold it."""

    replicas: int | None = None  # None: any worker with room
    device: str | None = None
    memory_mb: int | None = None  # None: the archive's size, rounded up to MiB


def check_locally(config: ModelConfig) -> str:
    """Load the model here, as a worker would, and describe its signature; or say why that
    cannot be done on this machine (TensorRT, a package not installed). A model that fails
    to load for any other reason raises ``ConfigError``. Blocking: run it on a thread."""
    from inferbus.engines import TensorRTEngine, create_engine

    engine = create_engine(config)
    if isinstance(engine, TensorRTEngine):
        return "not checked here: TensorRT plans are built and checked on the GPU worker"
    try:
        engine.load()
    except ConfigError as exc:
        if isinstance(exc.__cause__, ImportError):
            return f"not checked here: {exc}"
        raise ConfigError(f"the model does not load here: {exc} (--skip-check deploys it "
                          "anyway)") from exc  # fmt: skip
    try:
        signature = engine.signature
    finally:
        engine.close()
    specs = [f"{kind} {spec.name}: {spec.datatype} {list(spec.shape)}"
             for kind, group in (("in", signature.inputs), ("out", signature.outputs))
             for spec in group]  # fmt: skip
    return f"loads here ({engine.device}); " + ", ".join(specs)


async def owner_of(nats: NatsClient) -> str:
    """The account we are connected as, which a deployment records as its owner ("" on an
    open bus, or when the server will not say)."""
    try:
        reply = await nats.request("$SYS.REQ.USER.INFO", b"", timeout=1.0)
        account = orjson.loads(reply.data)["data"]["account"]
    except Exception:  # an old server, a permission: the owner is for people to read only
        return ""
    return "" if account == _OPEN_ACCOUNT or not isinstance(account, str) else account


def deployment_for(
    config: ModelConfig, version: int, archive: Archive, target: Target, owner: str
) -> Deployment:
    memory = target.memory_mb
    if memory is None:
        memory = math.ceil(archive.size / MIB)
    return Deployment(
        model=config.name, version=version, sha256=archive.sha256, size=archive.size,
        replicas=target.replicas, device=target.device, memory_mb=memory, owner=owner,
        has_code=archive.has_code,
    )  # fmt: skip


async def check_version_free(store: Store, deployment: Deployment) -> None:
    """A version, once deployed, keeps its files: a different archive needs a new version."""
    existing = await store.get(deployment.model, deployment.version)
    if existing is None or existing.sha256 == deployment.sha256:
        return
    taken = {d.version for d in await store.deployments() if d.model == deployment.model}
    raise ConfigError(
        f"{deployment.model} v{deployment.version} is deployed already with other files, and a "
        f"version's files never change (workers would keep the old ones): deploy this as "
        f"--version {max(taken | {deployment.version}) + 1}"
    )


async def wait_until_served(client: Client, deployment: Deployment, wait_s: float, say: Say) -> int:
    """Wait up to ``wait_s`` seconds until a worker serves the deployment; how many do. After
    ``DEMAND_AFTER_S`` it asks the store's workers to load it now (what a request for it would
    do). ``Unavailable`` when none serves it in time, with the reason a worker gave."""
    started = time.monotonic()
    reason, demanded, said = "", False, 0.0
    while (elapsed := time.monotonic() - started) < wait_s:
        serving = await _workers_serving(client, deployment)
        if serving:
            return serving
        if not demanded and elapsed >= DEMAND_AFTER_S:
            demanded = True
            reason = await _demand(client.nats, deployment, max(1.0, wait_s - elapsed))
            if reason:
                say(f"  a worker says: {reason}")
        if elapsed - said >= SAY_EVERY_S:
            said = elapsed
            say(f"  waiting for a worker to serve {deployment.model} v{deployment.version} "
                f"({elapsed:.0f} s of {wait_s:g} s)")  # fmt: skip
    why = f": {reason}" if reason else " (no worker has room, or none follows the store)"
    raise Unavailable(f"no worker served {deployment.model} v{deployment.version} within "
                      f"{wait_s:g} s{why}; the deployment stands, older versions were kept "
                      "(`inferbus deployments` shows the state)")  # fmt: skip


async def _workers_serving(client: Client, deployment: Deployment) -> int:
    models = await client.models(timeout=POLL_S)
    found = [m for m in models if (m.name, m.version) == (deployment.model, deployment.version)]
    return len(found[0].workers) if found else 0


async def _demand(nats: NatsClient, deployment: Deployment, timeout: float) -> str:
    """Ask ``DEMAND_SUBJECT`` to load the deployment (docs/PROTOCOL.md section 15); the error
    a worker answered, or "" (loaded, or no worker follows a store: keep watching)."""
    body = orjson.dumps({"model": deployment.model, "version": deployment.version})
    try:
        with nats_errors(DEMAND_SUBJECT, timeout, nobody=Unavailable):
            reply = await nats.request(DEMAND_SUBJECT, body, timeout=timeout)
    except RequestError as exc:
        return "" if isinstance(exc, Unavailable) else exc.message
    error = error_from_reply(reply.headers, reply.data)
    return "" if error is None else error.message


async def retire_others(store: Store, deployment: Deployment) -> list[str]:
    """Undeploy every other version of the deployment's model (they drain on the workers)."""
    others = [d for d in await store.deployments() if d.model == deployment.model]
    removed: list[str] = []
    for other in others:
        if other.version != deployment.version:
            removed += await store.delete(other.model, other.version)
    return removed
