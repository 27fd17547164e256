"""The OCR example end to end: pages/s through the bus vs the same pipeline in-process, bytes
on the wire with pages as raw uint8 or as JPEG, and one worker vs two.

    python -m scripts.bench.ocr [--pages 12] [--rounds 3]

Both sides run ``examples/ocr/app.read_pages`` on the same rendered pages (640x320, four lines
each) with the same pre- and post-processing; only where the networks run differs: a worker
process behind a nats-server, or the engines called directly here, at the models' batch sizes
(pages up to 4, crops of one padded width up to 32). Rounds alternate, so that drift on this
shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import inferbus
from examples.ocr import app, build_repo, detection, recognition, render
from examples.ocr.recognition import Reading
from inferbus.engines import Engine, create_engine
from scripts.bench import harness
from scripts.bench.models import Figure, table


def run_batched(
    engine: Engine, items: Sequence[dict[str, np.ndarray]], rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Each item's outputs; consecutive items of one shape run together, ``rows`` at most."""
    for _, same in itertools.groupby(items, key=lambda item: item["image"].shape):
        group = list(same)
        for start in range(0, len(group), rows):
            part = group[start : start + rows]
            outputs = engine({"image": np.concatenate([item["image"] for item in part])})
            for row in range(len(part)):
                yield {name: array[row : row + 1] for name, array in outputs.items()}


class InProcess:
    """``locate`` and ``read`` with the engines in this process: the baseline."""

    def __init__(self, repo: Path, alphabet: Sequence[str]) -> None:
        self.detector = create_engine(inferbus.load_model_config(repo / build_repo.DETECTOR))
        self.recognizer = create_engine(inferbus.load_model_config(repo / build_repo.RECOGNIZER))
        self.detector.load()
        self.recognizer.load()
        self.alphabet = alphabet

    async def locate(self, pages: Sequence[np.ndarray]) -> list[np.ndarray]:
        inputs = [detection.prepare(page) for page in pages]
        outputs = run_batched(self.detector, inputs, build_repo.DET_BATCH)
        return [detection.find_boxes(found) for found in outputs]

    async def read(self, crops: Sequence[np.ndarray]) -> list[Reading]:
        inputs = [recognition.prepare(crop) for crop in crops]
        outputs = run_batched(self.recognizer, inputs, build_repo.REC_BATCH)
        return [recognition.decode(found, self.alphabet) for found in outputs]


@dataclass(frozen=True, slots=True)
class Run:
    """One pass over the pages: its rate, the text read, and what it took."""

    pages_per_s: float
    texts: list[list[str]]
    sent_per_page: float = 0.0  # bytes this client's NATS connection sent
    received_per_page: float = 0.0
    cores_busy: float = 0.0  # CPU seconds per second, of this process, workers and nats-server


class Meter:
    """Bytes through one NATS connection and CPU time of some processes, between two reads."""

    def __init__(self, client: inferbus.Client, pids: list[int]) -> None:
        self.client = client
        self.pids = pids

    def read(self) -> tuple[int, int, float, float]:
        stats = self.client.nats.stats  # nats-py's running totals
        cpu = sum(harness.cpu_seconds(pid) for pid in self.pids)
        return stats["out_bytes"], stats["in_bytes"], cpu, time.perf_counter()

    async def run(self, pages: Sequence[np.ndarray], remote: app.Remote) -> Run:
        sent, received, cpu, started = self.read()
        done = await timed(pages, remote)
        sent_after, received_after, cpu_after, ended = self.read()
        count = len(pages)
        sent_per_page, received_per_page = (
            (sent_after - sent) / count,
            (received_after - received) / count,
        )
        cores = (cpu_after - cpu) / (ended - started)
        return Run(done.pages_per_s, done.texts, sent_per_page, received_per_page, cores)


async def timed(pages: Sequence[np.ndarray], runner: InProcess | app.Remote) -> Run:
    started = time.perf_counter()
    lines = await app.read_pages(pages, runner.locate, runner.read)
    rate = len(pages) / (time.perf_counter() - started)
    return Run(rate, [[line.reading.text for line in page] for page in lines])


@dataclass(frozen=True, slots=True)
class Measured:
    local: list[Run]
    raw: list[Run]
    jpeg: list[Run]
    two_workers: list[Run]


async def measure(pages: list[np.ndarray], rounds: int) -> Measured:
    repo = build_repo.build()
    alphabet = recognition.load_alphabet(repo.parent / build_repo.CHARACTERS)
    local = InProcess(repo, alphabet)
    found = Measured([], [], [], [])
    names = {build_repo.DETECTOR, build_repo.RECOGNIZER}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(inferbus.EmbeddedServer())
        first = stack.enter_context(harness.worker(server.url, repo))
        await harness.wait_for_models(server.url, names)
        async with inferbus.connect(server.url) as client:
            raw, jpeg = app.Remote(client, alphabet, "raw"), app.Remote(client, alphabet, "jpeg")
            for runner in (local, raw, jpeg):  # warm-up: the first calls of a shape are slow
                await timed(pages, runner)
            meter = Meter(client, [os.getpid(), first.pid, server.pid or first.pid])
            for _ in range(rounds):
                found.local.append(await timed(pages, local))
                found.raw.append(await meter.run(pages, raw))
                found.jpeg.append(await meter.run(pages, jpeg))
            second = stack.enter_context(harness.worker(server.url, repo))
            await harness.wait_for_models(server.url, names, workers=2)
            for _ in range(2):  # the second worker's warm-up: requests go to either
                await timed(pages, raw)
            meter.pids.append(second.pid)
            for _ in range(rounds):
                found.two_workers.append(await meter.run(pages, raw))
    return found


def mean(runs: list[Run], field: str = "pages_per_s") -> float:
    return sum(float(getattr(run, field)) for run in runs) / len(runs)


def figures(found: Measured) -> list[Figure]:
    local, raw = mean(found.local), mean(found.raw)
    jpeg, two = mean(found.jpeg), mean(found.two_workers)
    same = all(a.texts == b.texts for a, b in zip(found.raw, found.local, strict=True))
    cores = os.cpu_count() or 1
    return [
        Figure("OCR end to end, 1 worker, pages as raw uint8",
               f"{raw:.2f} pages/s (text {'identical' if same else '**differs**'})",
               f"{local:.2f} pages/s, engines in-process", raw / local, ">= 0.9x",
               raw / local >= 0.9),
        Figure("the same, pages as JPEG (quality 75)", f"{jpeg:.2f} pages/s",
               f"{raw:.2f} pages/s, pages as raw uint8", jpeg / raw, "report", True),
        Figure("2 workers vs 1 (cores busy: 1 worker "
               f"{mean(found.raw, 'cores_busy'):.2f}, 2 workers "
               f"{mean(found.two_workers, 'cores_busy'):.2f} of {cores})",
               f"{two:.2f} pages/s", f"{raw:.2f} pages/s, 1 worker", two / raw, "report", True),
    ]  # fmt: skip


def wire_table(found: Measured) -> str:
    lines = [
        "| pages travel as | bytes sent per page | bytes received per page | pages/s |",
        "|---|---|---|---|",
    ]
    for label, runs in (("raw uint8", found.raw), ("JPEG, quality 75", found.jpeg)):
        lines.append(
            f"| {label} | {mean(runs, 'sent_per_page'):,.0f} | "
            f"{mean(runs, 'received_per_page'):,.0f} | {mean(runs):.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pages", type=int, default=12, help="rendered pages per pass")
    parser.add_argument("--rounds", type=int, default=3, help="passes of each kind")
    args = parser.parse_args()
    pages = [render.render(seed).image for seed in range(args.pages)]
    found = asyncio.run(measure(pages, args.rounds))
    print(f"machine: {harness.machine()}")
    print(table(figures(found)))
    print()
    print("Bytes on the wire, both models, requests and replies (crops travel lz4 either way):")
    print()
    print(wire_table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
