"""``inferbus worker --store``: the flags of a worker that follows the model store."""

from __future__ import annotations

import argparse
from pathlib import Path

from inferbus.store.reconcile import StoreSettings, detect_device


def store_worker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model store", "Also serve what is deployed with `inferbus deploy` (docs/STORE.md)."
    )
    group.add_argument("--store", action="store_true",
                       help="load what is deployed in the model store, room allowing")  # fmt: skip
    group.add_argument("--max-models", type=int, default=4, metavar="N",
                       help="deployed models held at once (default 4); the least recently "
                       "used idle one is unloaded to load another on demand")  # fmt: skip
    group.add_argument("--memory-mb", type=int, metavar="MB",
                       help="a budget for the deployments' memory estimates")  # fmt: skip
    group.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help=f"what this worker runs on, for deployments that ask (default: "
                       f"detected, {detect_device()} here)")  # fmt: skip
    group.add_argument("--allow-code", action="store_true",
                       help="load deployed folders that ship code (engine_class .py, native "
                       "libraries): they run with this worker's rights")  # fmt: skip
    group.add_argument("--store-cache", type=Path, metavar="DIR",
                       help="where unpacked archives are kept, by sha256 (default "
                       "~/.cache/inferbus/store)")  # fmt: skip


def store_settings(args: argparse.Namespace) -> StoreSettings | None:
    """The settings the flags ask for; None without ``--store``."""
    if not args.store:
        return None
    given: dict[str, object] = {"max_models": args.max_models, "allow_code": args.allow_code}
    if args.memory_mb is not None:
        given["memory_mb"] = args.memory_mb
    if args.device is not None:
        given["device"] = args.device
    if args.store_cache is not None:
        given["cache_dir"] = args.store_cache
    return StoreSettings(**given)  # type: ignore[arg-type]
