"""Shared-bus benchmarks: fair sharing under a flood, and what tenancy costs a single tenant.

    python -m scripts.bench.tenancy                      # both; prints a Markdown table
    python -m scripts.bench.tenancy --only fairness
    python -m scripts.bench.tenancy --only single --baseline bac1122

**Fairness.** One worker serving the simulated GPU (20 ms a batch of at most 32 rows:
1,600 rows/s), on a bus made from a roster (``inferbus server --roster``'s configuration, nkeys,
an account per user). User B sends 1-row requests one at a time; its latency and rate alone
are the baseline. Then user A floods: 8-row requests offered at 10x the worker's capacity in
rows (open loop, through the inferbus client with its retries), while B goes on as before.
Targets: B's p99 within 3x its idle p99, and B at least 40% of its idle rate. The same flood
against a worker without a roster (one FIFO queue) shows what the fair queue buys.

**Single tenant.** Small-request throughput (1 KiB identity, concurrency 64) of this tree's
worker against a baseline revision's (a git worktree), on an open bus, in alternating rounds
in the same run. Target: within 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from nats.aio.msg import Msg
from onnx import TensorProto

import inferbus
from inferbus.codecs import InferRequest, encode_request
from inferbus.contract import infer_subject
from inferbus.natsserver import free_port
from inferbus.pipeline.connection import connect_nats
from inferbus.tenancy.credentials import identities
from inferbus.tenancy.state import apply_roster
from scripts.bench import harness, models
from scripts.bench.models import Figure
from scripts.bench.sim_gpu_engine import BATCH_SECONDS

ROOT = harness.ROOT
SIM_MAX_BATCH = 32
CAPACITY_ROWS = SIM_MAX_BATCH / BATCH_SECONDS
FLOOD_ROWS = 8
ROSTER = """
[workers.gpu]
[users.alice]
models = ["simgpu"]
[users.bob]
models = ["simgpu"]
"""


def sim_repository(folder: Path) -> Path:
    sim = folder / "simgpu"
    sim.mkdir(parents=True)
    shutil.copy(ROOT / "scripts/bench/sim_gpu_engine.py", sim / "sim_gpu_engine.py")
    (sim / "model.sim").write_text("the simulated engine reads no file\n")
    (sim / "config.toml").write_text(
        f'file = "model.sim"\nmax_batch_size = {SIM_MAX_BATCH}\nmax_queue_size = 4096\n'
        'engine_class = "sim_gpu_engine.py:SimulatedGpuEngine"\n'
    )
    return folder


@contextlib.contextmanager
def worker(repo: Path, *flags: str, cwd: Path = ROOT) -> Iterator[subprocess.Popen[str]]:
    with harness.process(
        "-m", "inferbus", "--log-level", "WARNING", "worker", str(repo), *flags,
        ready="worker ready", cwd=cwd,
    ) as child:  # fmt: skip
        yield child


async def b_alone_or_beside(
    options: inferbus.ConnectOptions, seconds: float, *, warm_up: bool
) -> np.ndarray:
    """User B: 1-row requests one at a time for ``seconds``; each one's latency."""
    x = np.zeros((1, 16), np.float32)
    out: list[float] = []
    async with inferbus.Client(options) as b:
        for _ in range(5 if warm_up else 0):
            await b.infer("simgpu", {"x": x})
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await b.infer("simgpu", {"x": x}, timeout=30)
            out.append(time.perf_counter() - started)
    return np.asarray(out)


async def flood(options: inferbus.ConnectOptions) -> int:
    """User A, in a process of its own: 8-row requests offered at 10x the worker's capacity
    in rows, open loop. Sent with nats-py directly (one encoded body, published with a reply
    inbox), so that on this 2-core machine the flood's own client does not starve the worker
    of CPU. Runs until SIGTERM, then returns the rows answered with outputs."""
    x = np.zeros((FLOOD_ROWS, 16), np.float32)
    body = encode_request(InferRequest("flood", {"x": x}, timeout_us=2_000_000))
    rate = 10 * CAPACITY_ROWS / FLOOD_ROWS  # requests per second
    answered = 0

    async def on_reply(msg: Msg) -> None:
        nonlocal answered
        if not msg.headers:  # errors (429s) carry headers; outputs do not
            answered += FLOOD_ROWS

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nats = await connect_nats(options)
    inbox = nats.new_inbox()
    await nats.subscribe(f"{inbox}.*", cb=on_reply)
    started, sent = time.perf_counter(), 0
    print("ready", flush=True)
    while not stop.is_set():
        elapsed = time.perf_counter() - started
        for _ in range(int(elapsed * rate) - sent):
            sent += 1
            await nats.publish(infer_subject("simgpu"), body, reply=f"{inbox}.{sent}")
        await asyncio.sleep(0.002)
    await nats.close()
    return answered


async def fairness_on(a: list[str], b: inferbus.ConnectOptions, seconds: float
                      ) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """B alone, then B beside A's flood (``a``: the flood's connection flags)."""
    idle = await b_alone_or_beside(b, seconds, warm_up=True)
    with harness.process("-m", "scripts.bench.tenancy", "--flood", *a) as flooding:
        started = time.perf_counter()
        await asyncio.sleep(1.0)  # let the flood fill the worker's queue first
        busy = await b_alone_or_beside(b, seconds, warm_up=False)
        flooding.terminate()
        out, _ = await asyncio.to_thread(flooding.communicate, timeout=60)
        flood_s = time.perf_counter() - started
    return idle, busy, int(out.split()[-1]) / flood_s


def p99(latencies: np.ndarray) -> float:
    return float(np.percentile(latencies, 99))


async def fairness(seconds: float) -> list[Figure]:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="inferbus-fairness-") as scratch:
        folder = Path(scratch)
        repo = sim_repository(folder / "repo")
        roster = folder / "roster.toml"
        roster.write_text(ROSTER)
        applied = apply_roster(roster, folder / "state", port=free_port())
        connection = {i.name: applied.connection_path(i) for i in identities(applied.roster)}
        with applied.settings.server(applied.accounts) as server, worker(
            repo, "--roster", str(roster), "--connection", str(connection["gpu"])
        ):  # fmt: skip
            b = inferbus.ConnectOptions.from_file(connection["bob"])
            await harness.wait_for_models_with(b, {"simgpu"})
            a = ["--connection", str(connection["alice"])]
            idle, busy, a_rate = await fairness_on(a, b, seconds)
            del server
        figures += fairness_figures("fair queue (roster)", idle, busy, a_rate)
        with inferbus.EmbeddedServer() as open_bus, worker(repo, "--servers", open_bus.url):
            plain = inferbus.ConnectOptions(servers=[open_bus.url])
            await harness.wait_for_models_with(plain, {"simgpu"})
            idle, busy, a_rate = await fairness_on(["--servers", open_bus.url], plain, seconds)
        figures += fairness_figures("one FIFO (no roster)", idle, busy, a_rate, targets=False)
    return figures


def fairness_figures(label: str, idle: np.ndarray, busy: np.ndarray, a_rate: float,
                     *, targets: bool = True) -> list[Figure]:  # fmt: skip
    latency = p99(busy) / p99(idle)
    share = (len(busy) / busy.sum()) / (len(idle) / idle.sum())
    return [
        Figure(
            f"{label}: B's p99 while A floods (A got {a_rate:,.0f} rows/s of "
            f"{CAPACITY_ROWS:,.0f})",
            f"{p99(busy) * 1e3:.1f} ms", f"{p99(idle) * 1e3:.1f} ms with A idle",
            latency, "<= 3x" if targets else "(no target)", latency <= 3 or not targets,
        ),
        Figure(
            f"{label}: B's rate while A floods",
            f"{len(busy) / busy.sum():.1f} req/s", f"{len(idle) / idle.sum():.1f} req/s alone",
            share, ">= 0.4x" if targets else "(no target)", share >= 0.4 or not targets,
        ),
    ]  # fmt: skip


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """``revision`` in a temporary git worktree."""
    with tempfile.TemporaryDirectory(prefix="inferbus-baseline-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           check=False, capture_output=True)  # fmt: skip


async def single_tenant(baseline: Path, label: str, seconds: float) -> list[Figure]:
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    rates: dict[str, list[float]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory(prefix="inferbus-single-") as scratch:
        repo = Path(scratch)
        models.identity(repo / "identity", TensorProto.FLOAT, [256], "max_batch_size = 64\n")
        with inferbus.EmbeddedServer() as server:
            async with inferbus.connect(server.url) as client:

                async def call() -> object:
                    return await client.infer("identity", {"x": x})

                for _ in range(3):
                    for name, cwd in (("baseline", baseline), ("this tree", ROOT)):
                        with worker(repo, "--servers", server.url, cwd=cwd):
                            await harness.wait_for_models(server.url, {"identity"})
                            rates[name].append(await harness.throughput(call, 64, seconds))
    ours, before = np.mean(rates["this tree"]), np.mean(rates["baseline"])
    ratio = float(ours / before)
    return [Figure(
        "single tenant: small requests, concurrency 64, this tree vs before tenancy",
        f"{ours:,.0f} req/s", f"{before:,.0f} req/s at {label}",
        ratio, ">= 0.95x", ratio >= 0.95,
    )]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=["fairness", "single"], action="append")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--baseline", default="bac1122", help="git revision before tenancy")
    parser.add_argument("--flood", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connection", help=argparse.SUPPRESS)
    parser.add_argument("--servers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:  # the flooding user, as a child process of the fairness benchmark
        options = (inferbus.ConnectOptions.from_file(args.connection) if args.connection
                   else inferbus.ConnectOptions(servers=[args.servers]))  # fmt: skip
        print(f"rows {asyncio.run(flood(options))}", flush=True)
        return 0
    only = args.only or ["fairness", "single"]
    figures: list[Figure] = []
    if "fairness" in only:
        figures += asyncio.run(fairness(args.seconds))
    if "single" in only:
        with checkout(args.baseline) as tree:
            figures += asyncio.run(single_tenant(tree, args.baseline, min(args.seconds, 3.0)))
    print(f"machine: {harness.machine()}")
    print(models.table(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
