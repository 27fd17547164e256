"""``inferbus demo``: a whole deployment on one machine, started and stopped in order.

An embedded nats-server, a worker process serving the repository, then the example
application as its own process — three processes, as in production, talking over NATS. With
``store``, the worker serves only the model store, each model is deployed with ``inferbus
deploy`` (time to first answer printed), the app runs, and the models are undeployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from inferbus.errors import InferbusError
from inferbus.natsserver import EmbeddedServer
from inferbus.pipeline.client import Client
from inferbus.pipeline.connection import ConnectOptions
from inferbus.repository import load_repository

READY_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _nats(servers: str | None, jetstream: bool, store_dir: Path | None) -> Iterator[str]:
    if servers:
        yield servers
        return
    with EmbeddedServer(jetstream=jetstream, store_dir=store_dir) as server:
        where = f"; JetStream in {server.jetstream_dir}" if jetstream else ""
        print(f"[demo] started nats-server at {server.url}{where}", flush=True)
        yield server.url


INFERBUS = [sys.executable, "-m", "inferbus"]


@contextlib.contextmanager
def _worker(repo: Path, url: str, store_cache: Path | None) -> Iterator[subprocess.Popen[bytes]]:
    command = [*INFERBUS, "--log-level", "WARNING", "worker"]
    serves = ["--store", "--store-cache", str(store_cache)] if store_cache else [str(repo)]
    process = subprocess.Popen([*command, *serves, "--servers", url])
    what = "the model store" if store_cache else str(repo)
    print(f"[demo] started worker (pid {process.pid}) for {what}", flush=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # drains: in-flight requests are answered
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print(f"[demo] worker stopped (exit {process.returncode})", flush=True)


async def _wait_until_served(url: str, names: set[str], worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with Client(ConnectOptions(servers=[url], name="inferbus-demo")) as client:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise InferbusError(f"worker exited with {worker.returncode} before it was ready")
            if names <= {m.name for m in await client.models(timeout=0.2)}:
                return
    raise InferbusError(f"worker did not serve {sorted(names)} within {READY_TIMEOUT_S:g}s")


def run_demo(
    *,
    repo: Path,
    app: Path,
    servers: str | None,
    jetstream: bool = True,
    store_dir: Path | None = None,
    store: bool = False,
) -> int:
    """Run the deployment; the app's exit status (non-zero when its checks fail). The server
    started runs JetStream (the model store) in ``store_dir`` unless ``jetstream`` is off."""
    if not app.is_file():
        raise InferbusError(f"example application {app} not found")
    configs = load_repository(repo)
    names = {config.name for config in configs}
    with (
        tempfile.TemporaryDirectory(prefix="inferbus-demo-cache-") as cache,
        _nats(servers, jetstream, store_dir) as url,
        _worker(repo, url, Path(cache) if store else None) as worker,
    ):
        if store:
            started = time.monotonic()
            for config in configs:
                _inferbus("deploy", str(config.directory), "--keep-old", "--servers", url)
        asyncio.run(_wait_until_served(url, names, worker))
        if store:
            print(f"[demo] deployed and served {time.monotonic() - started:.1f} s after the "
                  "first deploy began", flush=True)  # fmt: skip
        print(f"[demo] worker ready; running {app}", flush=True)
        status = subprocess.run(
            [sys.executable, str(app), "--servers", url, "--repo", str(repo)], check=False
        ).returncode
        if store:
            for name in sorted(names):
                _inferbus("undeploy", name, "--servers", url)
            _inferbus("deployments", "--servers", url)
        return status


def _inferbus(*args: str) -> None:
    print(f"[demo] inferbus {' '.join(args)}", flush=True)
    if subprocess.run([*INFERBUS, *args], check=False).returncode:
        raise InferbusError(f"`inferbus {args[0]}` failed (see above)")
