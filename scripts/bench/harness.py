"""Processes and measuring loops shared by the benchmark scripts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import numpy as np

import inferbus

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def process(
    *command: str, ready: str = "ready", cwd: Path = ROOT
) -> Iterator[subprocess.Popen[str]]:
    """A child process, started and waited for until it prints ``ready``; stopped after.
    ``cwd`` decides which tree's ``inferbus`` a ``-m inferbus`` child runs."""
    child = subprocess.Popen([sys.executable, *command], cwd=cwd, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if ready in line:
                break
        else:
            raise RuntimeError(f"{command} exited before it was ready")
        yield child
    finally:
        child.terminate()
        child.wait(timeout=30)


def worker(
    url: str, repo: Path, *models: str
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    flags = [arg for model in models for arg in ("--model", model)]
    return process(
        "-m", "inferbus", "--log-level", "WARNING", "worker", str(repo), *flags,
        "--servers", url, ready="worker ready",
    )  # fmt: skip


def raw_responder(
    url: str, subject: str, reply_bytes: int | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    """Echoes each request, or answers ``reply_bytes`` zero bytes when given."""
    size = [] if reply_bytes is None else [str(reply_bytes)]
    return process(str(ROOT / "scripts/bench/raw_responder.py"), url, subject, *size)


Call = Callable[[], Awaitable[object]]


async def latencies(call: Call, count: int, warmup: int = 200) -> np.ndarray:
    """Sequential calls (concurrency 1): each one's latency in seconds."""
    for _ in range(warmup):
        await call()
    out = np.empty(count)
    for i in range(count):
        started = time.perf_counter()
        await call()
        out[i] = time.perf_counter() - started
    return out


async def paired_p50(
    first: Call, second: Call, rounds: int = 10, per_round: int = 300
) -> tuple[float, float]:
    """Median latencies of two calls measured in alternating rounds, so drift hits both."""
    a: list[np.ndarray] = []
    b: list[np.ndarray] = []
    for _ in range(rounds):
        a.append(await latencies(first, per_round, warmup=20))
        b.append(await latencies(second, per_round, warmup=20))
    return float(np.median(np.concatenate(a))), float(np.median(np.concatenate(b)))


async def paired_throughput(
    first: Call, second: Call, concurrency: int, rounds: int = 3, seconds: float = 1.5
) -> tuple[float, float]:
    """Mean throughput of two calls measured in alternating rounds."""
    a, b = [], []
    for _ in range(rounds):
        a.append(await throughput(first, concurrency, seconds))
        b.append(await throughput(second, concurrency, seconds))
    return sum(a) / rounds, sum(b) / rounds


async def throughput(call: Call, concurrency: int, seconds: float, warmup: float = 0.5) -> float:
    """Closed loop: ``concurrency`` callers for ``seconds``; completed calls per second."""
    done = 0
    counting = False
    stop = False

    async def caller() -> None:
        nonlocal done
        while not stop:
            await call()
            done += counting

    async with asyncio.TaskGroup() as callers:
        for _ in range(concurrency):
            callers.create_task(caller())
        await asyncio.sleep(warmup)
        counting = True
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        counted, elapsed = done, time.perf_counter() - started
        stop = True
    return counted / elapsed


async def wait_for_models(url: str, names: set[str], workers: int = 1) -> None:
    await wait_for_models_with(inferbus.ConnectOptions(servers=[url]), names, workers)


async def wait_for_models_with(
    options: inferbus.ConnectOptions, names: set[str], workers: int = 1
) -> None:
    async with inferbus.Client(options) as client:
        for _ in range(300):
            models = {m.name: len(m.workers) for m in await client.models(timeout=0.1)}
            if all(models.get(name, 0) >= workers for name in names):
                return
    raise RuntimeError(f"models {names} not served by {workers} worker(s)")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_call(
    call: Call, pids: dict[str, int], calls: int, concurrency: int
) -> dict[str, float]:
    """CPU microseconds each process spends per call, over ``calls`` calls at ``concurrency``."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    per_caller = calls // concurrency

    async def caller() -> None:
        for _ in range(per_caller):
            await call()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    done = per_caller * concurrency
    return {name: (cpu_seconds(pid) - before[name]) / done * 1e6 for name, pid in pids.items()}


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
