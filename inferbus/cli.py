"""The ``inferbus`` command: run a NATS server, serve models, query and call them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from inferbus import example
from inferbus.errors import ConfigError, InferbusError
from inferbus.natsserver import default_store_dir
from inferbus.pipeline.client import Client
from inferbus.pipeline.connection import (
    CONNECTION_ENV,
    NKEY_ENV,
    SERVERS_ENV,
    ConnectOptions,
)
from inferbus.pipeline.discovery import ModelInfo
from inferbus.pipeline.worker import Worker
from inferbus.repository import load_repository
from inferbus.store.commands import COMMANDS as STORE_COMMANDS
from inferbus.store.commands import Handler
from inferbus.store.reconcile import StoreSettings
from inferbus.store.worker_flags import store_settings, store_worker_args
from inferbus.tenancy.commands import (
    cmd_roster,
    jetstream_options,
    open_settings,
    roster_args,
    roster_server,
    server_options,
    worker_options,
)
from inferbus.tenancy.live import RosterServer, follow, serve, signal_handlers
from inferbus.version import __version__

log = logging.getLogger("inferbus")
T = TypeVar("T")
ROSTER_ENV = "INFERBUS_ROSTER"
DEMO_STORE_DIR = default_store_dir().parent / "demo-jetstream"  # apart from `inferbus server`'s
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})  # where an open server is safe


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (measured faster for NATS I/O), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def connect_options(args: argparse.Namespace, name: str) -> ConnectOptions:
    """The connection flags; those not given fall back to the environment (ConnectOptions)."""
    return ConnectOptions.given(
        args.servers, name=name, connection=args.connection, creds=args.creds, nkey=args.nkey,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )  # fmt: skip


# --- server / worker / up ----------------------------------------------------------------------


def _jetstream_line(store_dir: Path | None) -> str:
    if store_dir is None:
        return "JetStream off: no model store (`inferbus deploy` needs it)"
    return f"JetStream on: the model store is kept in {store_dir}"


def cmd_server(args: argparse.Namespace) -> int:
    running = roster_server(args, monitor_port=args.monitor_port) if args.roster else None
    server = running.server if running else open_settings(args).server("", args.monitor_port)
    with server:
        print(f"nats-server listening on {server.url} (max_payload {server.max_payload} bytes)")
        if args.monitor_port:
            print(f"monitoring on http://{server.host}:{args.monitor_port} (no authentication)")
        print(_jetstream_line(server.jetstream_dir))
        if running is not None:
            print(f"roster {args.roster}; connection files in {running.state}")
        elif server.host not in _LOOPBACK:
            print(f"warning: no roster: anyone who reaches {server.url} can serve and call "
                  "models (docs/SECURITY.md)")  # fmt: skip
        ready = "; the roster is applied again when it changes or on SIGHUP" if running else ""
        run_async(serve(running, lambda: print(f"press Ctrl-C to stop{ready}", flush=True)))
    print("nats-server stopped")
    return 0


async def _serve(
    repo: Path | None,
    options: ConnectOptions,
    only: Sequence[str],
    metrics_port: int | None = None,
    *,
    roster: Path | None = None,
    following: RosterServer | None = None,
    store: StoreSettings | None = None,
) -> int:
    """Serve ``repo`` until SIGTERM/SIGINT; with ``following``, keep that server in step with
    its roster meanwhile (``inferbus up --roster``)."""
    configs = load_repository(repo) if repo is not None else []
    if only:
        unknown = set(only) - {c.name for c in configs}
        if unknown:
            raise InferbusError(f"{repo} has no model named {sorted(unknown)}")
        configs = [c for c in configs if c.name in only]
    hangup = asyncio.Event()
    async with Worker(
        configs, options, metrics_port=metrics_port, roster=roster, store=store
    ) as worker:
        with signal_handlers({signal.SIGHUP: hangup.set} if following else {}):
            print(f"worker ready: {len(configs)} model version(s) on {options.servers[0]}",
                  flush=True)  # fmt: skip
            async with asyncio.TaskGroup() as group:
                watching = group.create_task(follow(following, hangup)) if following else None
                await worker.wait()
                if watching is not None:
                    watching.cancel()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    options = connect_options(args, "inferbus-worker")
    store = store_settings(args)
    if args.repo is None and store is None:
        raise ConfigError("give a model repository, or --store to serve what is deployed")
    return run_async(_serve(args.repo, options, args.model, args.metrics_port,
                            roster=args.roster, store=store))  # fmt: skip


def cmd_up(args: argparse.Namespace) -> int:
    running = roster_server(args) if args.roster else None
    if running is not None:
        server, options = running.server, worker_options(running, args.worker)
    else:
        settings = open_settings(args)
        server = settings.server("")
        tls_ca = None if settings.tls_ca is None else str(settings.tls_ca)
        options = ConnectOptions(servers=[server.url], name="inferbus-worker", tls_ca=tls_ca)
    with server:
        where = f"; roster {args.roster}, connection files in {running.state}" if running else ""
        print(f"nats-server listening on {server.url}{where}", flush=True)
        print(_jetstream_line(server.jetstream_dir))
        serving = _serve(args.repo, options, args.model, roster=args.roster, following=running)
        return run_async(serving)


# --- models / infer ---------------------------------------------------------------------------


def _describe(model: ModelInfo) -> str:
    specs = [
        f"    {kind} {spec.name}: {spec.datatype} {list(spec.shape)}"
        for kind, group in (("in ", model.signature.inputs), ("out", model.signature.outputs))
        for spec in group
    ]
    head = (
        f"{model.name} v{model.version}  engine={model.engine} devices={','.join(model.devices)} "
        f"max_batch={model.max_batch_size} workers={len(model.workers)}"
    )
    return "\n".join([head, *specs])


async def _models(args: argparse.Namespace) -> int:
    async with Client(connect_options(args, "inferbus-cli")) as client:
        models = await client.models(timeout=args.timeout)
    if args.json:
        print(orjson.dumps([_model_dict(m) for m in models], option=orjson.OPT_INDENT_2).decode())
    elif not models:
        print("no models are served (no inferbus worker answered)")
    else:
        print("\n".join(_describe(m) for m in models))
    return 0


def _model_dict(model: ModelInfo) -> dict[str, Any]:
    return {
        "name": model.name,
        "version": model.version,
        "engine": model.engine,
        "devices": list(model.devices),
        "max_batch_size": model.max_batch_size,
        "workers": list(model.workers),
        "signature": model.signature.to_dict(),
    }


def cmd_models(args: argparse.Namespace) -> int:
    return run_async(_models(args))


def _load_inputs(pairs: Sequence[str]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:
            raise InferbusError(f"--input takes NAME=FILE.npy, not {pair!r}")
        # allow_pickle=False: an .npy file from elsewhere must not run code.
        inputs[name] = np.load(path, allow_pickle=False)
    return inputs


async def _infer(args: argparse.Namespace) -> int:
    async with Client(connect_options(args, "inferbus-cli")) as client:
        inputs = _load_inputs(args.input)
        if not inputs:
            found = [m for m in await client.models() if m.name == args.model_name]
            found = [m for m in found if args.version in (None, m.version)]
            if not found:
                raise InferbusError(f"no worker serves {args.model_name}; cannot make inputs")
            inputs = found[-1].signature.examples(batch=1)
            print(
                f"no --input given: sending zeros shaped by the signature of v{found[-1].version}"
            )
        result = await client.infer(
            args.model_name, inputs, version=args.version, timeout=args.timeout
        )
    print(f"{result.model_name} v{result.model_version}")
    for name, value in result.items():
        print(f"{name}: {value.dtype} {list(value.shape)}\n{value}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    return run_async(_infer(args))


async def _bench(args: argparse.Namespace) -> int:
    from inferbus.bench import (
        BenchConfig,
        inputs_from_file,
        inputs_from_signature,
        report,
        run_bench,
    )

    config = BenchConfig(
        model=args.model_name,
        version=args.version,
        concurrency=tuple(_numbers(args.concurrency, int)),
        request_rates=tuple(_numbers(args.request_rate, float)) if args.request_rate else (),
        poisson=args.distribution == "poisson",
        window_s=args.window,
        warmup_s=args.warmup,
        stability=args.stability / 100,
        max_windows=args.max_windows,
    )
    async with Client(connect_options(args, "inferbus-bench")) as client:
        info = await client.describe(config.model, config.version)
        if args.input_file:
            inputs = inputs_from_file(args.input_file, info.signature)
        else:
            inputs = inputs_from_signature(info.signature, batch=args.batch_size)
        where = f"{info.name} v{info.version} on {len(info.workers)} worker(s)"
        print(f"{where}; {config.window_s:g}s windows until 3 agree within {args.stability:g}%")
        print(report.header(), flush=True)
        results = await run_bench(
            client, config, inputs, on_level=lambda r: print(report.row(r), flush=True)
        )
    if args.json:
        report.write_json(args.json, config, results)
    if args.csv:
        report.write_csv(args.csv, results)
    return 0


def _numbers(text: str, kind: Callable[[str], Any]) -> list[Any]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InferbusError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    return run_async(_bench(args))


async def _status(args: argparse.Namespace) -> int:
    from inferbus.status import ClusterStatus, rates, render, snapshot
    from inferbus.tenancy.usage import view as usage_view

    async with Client(connect_options(args, "inferbus-status")) as client:
        previous: ClusterStatus | None = None
        while True:
            if args.by_user:
                shown, text = await usage_view(client.nats)
            else:
                current = await snapshot(client)
                rates(current, previous)
                previous = current
                shown, text = current.to_dict(), render(current)
            if args.json:
                print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
            else:
                clear = "" if args.once else "\033[2J\033[H"  # redraw in place on a terminal
                print(clear + text, flush=True)
            if args.once:
                return 0
            await asyncio.sleep(args.interval)


def cmd_status(args: argparse.Namespace) -> int:
    return run_async(_status(args))


def cmd_build(args: argparse.Namespace) -> int:
    from inferbus.engines.tensorrt.build import ensure_plan
    from inferbus.repository import load_model_config

    config = load_model_config(args.model_dir)
    plan = ensure_plan(config, build=True)
    size = plan.stat().st_size
    print(f"{config.name} v{config.version}: TensorRT plan ready ({size:,} bytes): {plan}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from inferbus._demo import run_demo

    store_dir = args.store_dir or DEMO_STORE_DIR
    if args.store and args.jetstream is False:
        raise ConfigError("--store needs JetStream: drop --no-jetstream")
    return run_demo(repo=args.repo, app=args.app, servers=args.servers,
                    jetstream=args.jetstream is not False, store_dir=store_dir,
                    store=args.store)  # fmt: skip


def cmd_gateway(args: argparse.Namespace) -> int:
    try:  # the HTTP stack loads only here: `import inferbus` and the parser never need it
        from inferbus.gateway.serve import GatewaySettings, run_gateway
    except ImportError as exc:
        raise ConfigError(f"the gateway needs its extra: pip install 'inferbus[gateway]' ({exc})"
                          ) from None  # fmt: skip
    options = connect_options(args, "inferbus-gateway")
    settings = GatewaySettings(timeout=args.timeout, max_body_bytes=args.max_body_mb << 20,
                               max_inflight_bytes=args.max_inflight_mb << 20)  # fmt: skip
    return run_async(run_gateway(options, args.host, args.port, settings, args.per_user))


def _gateway_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may take when it sets no parameters.timeout",
    )
    parser.add_argument("--max-body-mb", type=int, default=512,
                        help="largest request body (413 beyond)")  # fmt: skip
    parser.add_argument("--max-inflight-mb", type=int, default=1024,
                        help="bytes all request bodies may hold at once (429 beyond)")  # fmt: skip
    parser.add_argument(
        "--per-user",
        action="store_true",
        help="shared bus: each caller's HTTP basic credentials are their own "
        "NATS user and password (or nkey seed); no identity of its own",
    )
    parser.epilog = "KServe V2 REST (tritonclient, curl) onto the bus: docs/GATEWAY.md"


# --- parser -----------------------------------------------------------------------------------


def _connection_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("NATS connection")
    group.add_argument(
        "--servers",
        help=f"comma-separated NATS URLs (default ${SERVERS_ENV} or nats://127.0.0.1:4222)",
    )
    group.add_argument("--creds", help="NATS credentials file (default $INFERBUS_CREDS)")
    group.add_argument("--nkey", help=f"file holding an nkey seed, SU... (default ${NKEY_ENV})")
    group.add_argument(
        "--connection",
        help=f"connection file from `inferbus roster apply`: servers, key and CA in one "
        f"(default ${CONNECTION_ENV}); --servers and --tls-* override what it says",
    )
    group.add_argument("--tls-ca", help="CA bundle (PEM) that signs the server's certificate")
    group.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    group.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferbus",
        description="Remote inference over NATS: apps send tensors, workers run models.",
    )
    parser.add_argument("--version", action="version", version=f"inferbus {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_parser()
    for name, handler, summary, configure, connects in _commands():
        parents = [conn] if connects else []
        sub = commands.add_parser(name, help=summary, description=summary, parents=parents)
        configure(sub)
        sub.set_defaults(handler=handler)
    return parser


Configure = Callable[[argparse.ArgumentParser], None]


def _commands() -> list[tuple[str, Callable[[argparse.Namespace], int], str, Configure, bool]]:
    """Each command: name, handler, one-line summary, its arguments, whether it uses NATS."""
    return [
        ("server", cmd_server, "run the embedded nats-server (with --roster: a shared bus)",
         _server_args, False),
        ("roster", cmd_roster, "check a roster, or apply it: server config, keys, connection "
         "files", roster_args, False),
        ("worker", cmd_worker, "serve a model repository on a NATS server", _worker_args, True),
        ("up", cmd_up, "embedded nats-server and a worker in one process", _up_args, False),
        ("models", cmd_models, "list the models served, with signatures", _models_args, True),
        ("status", cmd_status, "live view of workers and models (Ctrl-C to stop)", _status_args,
         True),
        ("infer", cmd_infer, "send one request and print the outputs", _infer_args, True),
        ("bench", cmd_bench, "latency and throughput under load", _bench_args, True),
        ("build", cmd_build, "build (or find) a model's TensorRT plan", _build_args, False),
        ("demo", cmd_demo, "server, worker and the digits app", _demo_args, False),
        ("gateway", cmd_gateway, "KServe V2 HTTP front door (tritonclient, curl) onto the bus",
         _gateway_args, True),
        *((name, _store_command(handler), summary, configure, True)
          for name, handler, summary, configure in STORE_COMMANDS),
    ]  # fmt: skip


def _store_command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """A model-store command (inferbus/store/commands.py) run with the connection flags."""
    return lambda args: run_async(handler(args, connect_options(args, "inferbus-store")))


def _server_args(parser: argparse.ArgumentParser) -> None:
    server_options(parser)
    parser.add_argument(
        "--monitor-port",
        type=int,
        help="also serve NATS HTTP monitoring here, on the listen address (no authentication)",
    )
    parser.epilog = (
        "Without --roster anyone who reaches the port may serve and call models: keep it on "
        "127.0.0.1. With --roster, every user has an account of their own and a key; "
        "`inferbus roster apply` explains the files. Edit the roster (or send SIGHUP) to apply "
        "it again: connected workers stay connected, removed identities are cut off."
    )


def _repo_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    help_text = "model repository: <repo>/<model>/config.toml"
    if optional:  # a worker may serve only what the model store deploys
        parser.add_argument("repo", type=Path, nargs="?", help=f"{help_text} (or only --store)")
    else:
        parser.add_argument("repo", type=Path, help=help_text)
    parser.add_argument(
        "--model", action="append", default=[], help="serve only this model (repeatable)"
    )


def _worker_args(parser: argparse.ArgumentParser) -> None:
    _repo_args(parser, optional=True)
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics (inferbus_*) on this port"
    )
    parser.add_argument(
        "--roster",
        type=Path,
        default=os.environ.get(ROSTER_ENV) or None,
        help="on a shared bus: enforce this roster's grants and quotas (re-read on change); "
        f"connect with --connection FILE of a worker identity (default ${ROSTER_ENV})",
    )
    store_worker_args(parser)
    parser.epilog = "Stops gracefully on SIGTERM/SIGINT: requests already received are answered."


def _up_args(parser: argparse.ArgumentParser) -> None:
    _repo_args(parser)
    server_options(parser)
    parser.add_argument(
        "--worker", metavar="NAME", help="with --roster: the worker identity to serve as "
        "(default: the roster's first worker)"
    )  # fmt: skip


def _models_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--timeout", type=float, default=0.5, help="seconds to gather answers")


def _infer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name", metavar="MODEL", help="model name")
    parser.add_argument("--version", type=int, help="pin a model version")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="an input tensor from a .npy file (repeatable); zeros from the signature if none",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")


def _bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name", metavar="MODEL", help="model name")
    parser.add_argument("--version", type=int, help="pin a model version")
    parser.add_argument(
        "--concurrency", default="1,4,16,64", help="closed-loop levels: callers in flight"
    )
    parser.add_argument(
        "--request-rate", help="open-loop levels in requests/s (replaces --concurrency)"
    )
    parser.add_argument(
        "--distribution", choices=("constant", "poisson"), default="constant",
        help="request-rate schedule",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1, help="rows per generated request")
    parser.add_argument("--input-file", type=Path, help=".npz (one array per input) or .npy")
    parser.add_argument("--window", type=float, default=2.0, help="measurement window, seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up per level, seconds")
    parser.add_argument(
        "--stability", type=float, default=10.0, help="percent within which 3 windows must agree"
    )
    parser.add_argument("--max-windows", type=int, default=10, help="give up on stability after")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--csv", type=Path, help="also write the results as CSV here")


def _status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="JSON instead of the table")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument(
        "--by-user",
        action="store_true",
        help="per model, each user's requests, rows, compute seconds and refusals, summed over "
        "workers (workers run with a roster; a user sees only their own row)",
    )


def _build_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, metavar="REPO/MODEL", help="a model folder")
    parser.epilog = (
        "Needs TensorRT and an NVIDIA GPU. Plans are cached in the model folder's .plans/ "
        "under a key of the ONNX file, TensorRT version, GPU and build settings; builders "
        "that race take turns."
    )


def _demo_args(parser: argparse.ArgumentParser) -> None:
    packaged = "default: the packaged digits example"
    parser.add_argument("--repo", type=Path, default=example.MODELS,
                        help=f"model repository to serve ({packaged})")  # fmt: skip
    parser.add_argument("--app", type=Path, default=example.APP,
                        help=f"the application to run ({packaged})")  # fmt: skip
    parser.add_argument("--servers", help="use this NATS server instead of starting one")
    parser.add_argument(
        "--store", action="store_true",
        help="through the model store: a worker with --store and nothing else, then `inferbus "
        "deploy` of each model in --repo, the app, and `inferbus undeploy` (docs/STORE.md)",
    )  # fmt: skip
    jetstream_options(parser, default=str(DEMO_STORE_DIR))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args))
    except InferbusError as exc:
        print(f"inferbus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
