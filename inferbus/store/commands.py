"""The command line's model-store parts: ``inferbus deploy``, ``undeploy`` and ``deployments``.

Each command is ``(name, handler, summary, arguments)`` in ``COMMANDS``; a handler is a
coroutine of the parsed arguments and the connection options, which ``inferbus.cli`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import orjson
from tqdm import tqdm

from inferbus.contract import NAME_PATTERN, service_subject
from inferbus.errors import ConfigError
from inferbus.pipeline.client import Client
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.discovery import ModelInfo, gather
from inferbus.repository import load_model_config
from inferbus.store import deploy as steps
from inferbus.store.archive import Archive, code_files, pack
from inferbus.store.client import Store, jetstream_access
from inferbus.store.records import DEVICES, Deployment
from inferbus.store.remote import deploy_remote, undeploy_remote

DEFAULT_WAIT_S: Final = 120.0
CODE_HELP: Final = (
    "deploy a folder that ships code (an engine_class .py file, any .py, .so ...): every worker "
    "that loads it runs that code, so deploy only what you trust; workers load code only when "
    "started to allow it"
)

Handler = Callable[[argparse.Namespace, ConnectOptions], Coroutine[Any, Any, int]]


def _say(text: str) -> None:
    print(text, flush=True)


# --- inferbus deploy ----------------------------------------------------------------------------


async def deploy(args: argparse.Namespace, options: ConnectOptions) -> int:
    config = load_model_config(args.folder)
    if args.name is not None:
        config = dataclasses.replace(config, name=args.name)  # checked as a name there
    code = code_files(args.folder)
    if code and not args.allow_code:
        raise ConfigError(f"{args.folder} ships code ({', '.join(code)}): deploying it makes "
                          "every worker that loads it run it. If you trust it, add --allow-code "
                          "(docs/SECURITY.md)")  # fmt: skip
    if not args.skip_check:
        _say(f"{config.name}: {await asyncio.to_thread(steps.check_locally, config)}")
    target = steps.Target(args.replicas, args.device, args.memory_mb)
    with tempfile.TemporaryDirectory(prefix="inferbus-deploy-") as folder:
        archive = await asyncio.to_thread(pack, args.folder, Path(folder) / "model.tar")
        async with Client(options) as client:
            version = args.version or config.version
            if await jetstream_access(client.nats):
                owner = await steps.owner_of(client.nats)
                deployment = steps.deployment_for(config, version, archive, target, owner)
                store = await Store.open(client.nats, replicas=args.bucket_replicas)
                await _write(store, archive, deployment)
            else:  # a user of a shared bus: a worker that follows the store writes it
                deployment = steps.deployment_for(config, version, archive, target, "")
                await _write_through_worker(options, archive, deployment)
                store = None
            return await _roll_out(args, client, store, deployment)


async def _write(store: Store, archive: Archive, deployment: Deployment) -> None:
    await steps.check_version_free(store, deployment)
    with tqdm(total=archive.size, unit="B", unit_scale=True, unit_divisor=1024,
              desc="upload", disable=None, file=sys.stderr) as bar:  # fmt: skip
        sent = await store.upload(archive, progress=bar.update)
    await store.put(deployment)
    kept = "" if sent else " (the store held this archive already)"
    _say(f"deployed {_name(deployment)}: {archive.size:,} bytes, sha256 "
         f"{archive.sha256[:12]}{kept}")  # fmt: skip


async def _write_through_worker(
    options: ConnectOptions, archive: Archive, deployment: Deployment
) -> None:
    _say("this identity has no JetStream of its own: deploying through a store worker")
    fields = {"model": deployment.model, "version": deployment.version,
              "replicas": deployment.replicas, "device": deployment.device,
              "memory_mb": deployment.memory_mb}  # fmt: skip
    await deploy_remote(options, archive, fields)
    _say(f"deployed {_name(deployment)}: {archive.size:,} bytes, sha256 {archive.sha256[:12]}")


async def _roll_out(
    args: argparse.Namespace, client: Client, store: Store | None, deployment: Deployment
) -> int:
    if not args.replace or args.wait <= 0:
        why = "--keep-old" if not args.replace else "--wait 0"
        _say(f"{why}: other versions of {deployment.model} stay deployed")
        return 0
    _say(f"waiting up to {args.wait:g} s for a worker to serve {_name(deployment)} ...")
    serving = await steps.wait_until_served(client, deployment, args.wait, _say)
    _say(f"{_name(deployment)} is served by {serving} worker(s)")
    if store is None:
        _say(f"other versions of {deployment.model} stay deployed (this identity cannot list "
             "them): `inferbus undeploy MODEL@VERSION` undeploys one")  # fmt: skip
        return 0
    retired = await steps.retire_others(store, deployment)
    if retired:
        _say(f"undeployed {', '.join(retired)}: workers drain and unload them")
    return 0


def _name(deployment: Deployment) -> str:
    return f"{deployment.model} v{deployment.version}"


def deploy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "folder",
        type=Path,
        metavar="FOLDER",
        help="a model folder: config.toml and the model file(s)",
    )
    parser.add_argument(
        "--name",
        help="the model name to deploy as (default: config.toml's name, else the folder's); "
        "on a shared bus a user's own models are named <user>-...",
    )
    parser.add_argument(
        "--version",
        type=_positive,
        help="the version to deploy as (default: config.toml's version)",
    )
    parser.add_argument(
        "--replicas",
        type=_replicas,
        default=None,
        metavar="N|any",
        help="how many workers hold it (default any: every worker with room)",
    )
    parser.add_argument(
        "--device",
        choices=sorted(DEVICES),
        help="only workers with this device load it (default: any)",
    )
    parser.add_argument(
        "--memory-mb",
        type=_positive,
        dest="memory_mb",
        help="memory it takes on a worker, for workers with a memory budget "
        "(default: the archive's size)",
    )
    parser.add_argument("--allow-code", action="store_true", help=CODE_HELP)
    parser.add_argument(
        "--skip-check",
        action="store_true",
        help="do not load the model here first (it is loaded, where the "
        "packages are installed, to check it and show its signature)",
    )
    rollout = parser.add_mutually_exclusive_group()
    rollout.add_argument(
        "--replace",
        dest="replace",
        action="store_true",
        default=True,
        help="once a worker serves this version, undeploy the model's other "
        "versions: they drain on the workers (default)",
    )
    rollout.add_argument(
        "--keep-old", dest="replace", action="store_false", help="leave the other versions deployed"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help=f"with --replace, seconds to wait for a worker to serve it "
        f"(default {DEFAULT_WAIT_S:g}; 0: do not wait and keep the other "
        "versions)",
    )
    parser.add_argument(
        "--bucket-replicas",
        type=_positive,
        default=1,
        metavar="N",
        help="copies of the store's buckets on a JetStream cluster, when this "
        "deploy creates them (the first one does; docs/CLUSTER.md)",
    )
    parser.epilog = (
        "Checks the folder here, packs it (one tar; .plans/ and dotfiles stay behind), uploads "
        "it to the server's JetStream and records the deployment; workers started with --store "
        "load it. Exits 1 if no worker serves it within --wait (it stays deployed)."
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _replicas(text: str) -> int | None:
    return None if text == "any" else _positive(text)


# --- inferbus undeploy --------------------------------------------------------------------------


async def undeploy(args: argparse.Namespace, options: ConnectOptions) -> int:
    model, version = _model_version(args.target)
    async with Client(options) as client:
        if await jetstream_access(client.nats):
            removed = await (await Store.open(client.nats)).delete(model, version)
        else:  # a user of a shared bus: through a worker, which checks they deployed it
            removed = await undeploy_remote(options, model, version)
    if not removed:
        raise ConfigError(f"nothing is deployed as {args.target} (`inferbus deployments`)")
    _say(f"undeployed {', '.join(removed)}: workers drain and unload them")
    return 0


def _model_version(text: str) -> tuple[str, int | None]:
    model, at, version = text.partition("@")
    if not NAME_PATTERN.fullmatch(model) or (at and not version.isdigit()) or version == "0":
        raise ConfigError(f"expected MODEL or MODEL@VERSION (a version >= 1), not {text!r}")
    return model, int(version) if at else None


def undeploy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODEL[@VERSION]",
                        help="a model's deployments, all versions or one")  # fmt: skip
    parser.epilog = "Workers drain what they hold of it (requests received are answered)."


# --- inferbus deployments -----------------------------------------------------------------------


async def deployments(args: argparse.Namespace, options: ConnectOptions) -> int:
    def malformed(key: str, error: ConfigError) -> None:
        print(f"warning: record {key!r} skipped: {error}", file=sys.stderr)

    async with Client(options) as client:
        store = await Store.open(client.nats)
        desired = await store.deployments(on_malformed=malformed)
        served, workers = await asyncio.gather(
            client.models(timeout=args.timeout),
            gather(client.nats, service_subject("PING"), timeout=args.timeout),
        )
    rows = [_row(d, served, len(workers)) for d in desired]
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif not rows:
        print("nothing is deployed (`inferbus deploy FOLDER`)")
    else:
        print(_table(rows))
    return 0


def _row(deployment: Deployment, served: list[ModelInfo], workers: int) -> dict[str, Any]:
    found = [m for m in served if (m.name, m.version) == (deployment.model, deployment.version)]
    serving = list(found[0].workers) if found else []
    devices = {device for model in served for device in model.devices}
    return {
        "model": deployment.model,
        "version": deployment.version,
        "replicas": deployment.replicas,
        "device": deployment.device,
        "memory_mb": deployment.memory_mb,
        "size": deployment.size,
        "sha256": deployment.sha256,
        "has_code": deployment.has_code,
        "owner": deployment.owner,
        "deployed_at": deployment.deployed_at,
        "workers": serving,
        "state": _state(deployment, len(serving), workers, devices),
    }


def _state(deployment: Deployment, serving: int, workers: int, devices: set[str]) -> str:
    if serving:
        wanted = deployment.replicas
        of = f" of {wanted}" if wanted is not None and serving < wanted else ""
        return f"serving on {serving}{of} worker{'s' if serving + (wanted or 0) > 1 else ''}"
    if workers == 0:
        return "not loaded (no worker is running)"
    if deployment.device is not None and devices and deployment.device not in devices:
        return f"not loaded (no worker with a {deployment.device} device serves anything)"
    return "not loaded (no worker has room; a request for it loads it)"


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("MODEL", "VERSION", "REPLICAS", "DEVICE", "MEMORY", "SIZE", "SHA256", "AGE", "STATE")
    now = time.time()
    body = [
        (row["model"], str(row["version"]), str(row["replicas"] or "any"),
         row["device"] or "any", f"{row['memory_mb']} MB", _size(row["size"]),
         row["sha256"][:12] + (" code" if row["has_code"] else ""),
         _age(now - row["deployed_at"]), row["state"])
        for row in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]])
        for line in (head, *body)
    )


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{max(0.0, seconds):.0f}s"


def deployments_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--timeout", type=float, default=0.5,
                        help="seconds to gather the workers' answers")  # fmt: skip
    parser.epilog = (
        "One row per deployment: what the store asks for (the KV bucket) beside what the "
        "workers serve now (discovery)."
    )


COMMANDS: Final[list[tuple[str, Handler, str, Callable[[argparse.ArgumentParser], None]]]] = [
    ("deploy", deploy, "deploy a model folder to the workers through the model store", deploy_args),
    ("undeploy", undeploy, "undeploy a model, or one version of it", undeploy_args),
    ("deployments", deployments, "what is deployed, and which workers serve it", deployments_args),
]  # fmt: skip
