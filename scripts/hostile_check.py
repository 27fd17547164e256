"""Measure what hostile traffic (issue 10) does to a worker and a client, as a markdown table.

    python -m scripts.hostile_check                      # everything, about 1.5 minutes
    python -m scripts.hostile_check --only bombs --out hostile.md --append

Every attack runs against real nats-server processes on 127.0.0.1 and workers run as child
processes (their peak RSS is read from /proc). The attacks are those of tests/test_hostile.py
(tests/hostile.py builds them); this script reports figures instead of pass/fail:

- poison: seconds until a worker (poisoned $SRV.PING) and a client (a poisoned subscription)
  answer requests again;
- bombs: for each decode bomb, the time to its 4xx reply, the longest wait of a probe sending
  one small request every 20 ms to another model on the same worker, and the worker's peak RSS
  growth; then six bombs at once in chunked transfers;
- flood: 1-row requests at 10x the worker's capacity: slow-consumer disconnects in the server
  log, and what a well-behaved client (30 s budget, default retries) got: lost requests, 404s,
  p99 latency;
- client: the client process's peak RSS growth under reply bombs from a fake worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nats
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

import inferbus
from tests.hostile import (
    ADD,
    BOMBS,
    GIB,
    Bomb,
    EvilWorker,
    PeakMeter,
    WorkerProcess,
    answered_again,
    body_answer,
    capacity,
    digits_body,
    error_code,
    flood,
    hostile_repo,
    inflating_reply,
    offer_answer,
    poison,
    send_in_chunks,
    small_add_body,
    transfer_bombs,
)

RECOVER_S = 15.0  # give up measuring a poisoned connection after this long
PROBE_EVERY_S = 0.02
SECTIONS = ("poison", "bombs", "flood", "client")


@dataclass(frozen=True, slots=True)
class Row:
    """One figure: what was measured, its value, the contract's target and whether it is met."""

    attack: str
    figure: str
    value: str
    target: str = ""
    met: bool | None = None


def mark(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**no**")


def markdown(rows: Sequence[Row], stamp: str) -> str:
    lines = [
        f"## Hostile traffic ({stamp})",
        "",
        "| attack | figure | value | target | met |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.attack} | {r.figure} | {r.value} | {r.target} | {mark(r.met)} |" for r in rows]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def raw_connection(url: str) -> AsyncIterator[NatsClient]:
    connection = await nats.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


# --- poison ------------------------------------------------------------------------------------


def recovery_row(attack: str, took: float | None) -> Row:
    value = f"{took:.1f} s" if took is not None else f"> {RECOVER_S:.0f} s"
    return Row(attack, "seconds until requests are answered again", value, "<= 5 s",
               took is not None and took <= 5.0)  # fmt: skip


async def poisoned_worker(url: str, repo: Path) -> Row:
    with WorkerProcess(url, repo, "add"):
        async with inferbus.connect(url) as client:
            await client.infer("add", ADD, timeout=10)
            await poison(url, "$SRV.PING")
            took = await answered_again(client, "add", RECOVER_S)
    return recovery_row("poisoned $SRV.PING (worker)", took)


async def poisoned_client(url: str, repo: Path) -> Row:
    with WorkerProcess(url, repo, "add"):
        async with inferbus.connect(url) as client:
            took: float | None = None
            try:
                await client.nats.subscribe("hostile.victim.events")
                await client.infer("add", ADD, timeout=10)
                await poison(url, "hostile.victim.events")
                took = await answered_again(client, "add", RECOVER_S)
            finally:
                if took is None:  # a wedged connection cannot drain
                    await asyncio.wait_for(client.nats.close(), 5)
    return recovery_row("poisoned subscription (client)", took)


async def poison_rows(repo: Path) -> list[Row]:
    rows = []
    for attack in (poisoned_worker, poisoned_client):
        with inferbus.EmbeddedServer() as server:
            rows.append(await attack(server.url, repo))
    return rows


# --- decode bombs ------------------------------------------------------------------------------


class Probe:
    """One small request to ``add`` every 20 ms; the longest any of them waited."""

    def __init__(self, raw: NatsClient) -> None:
        self.raw = raw
        self.longest = 0.0
        self.failed = 0
        self._stop = asyncio.Event()

    async def run(self, limit_s: float = 30.0) -> None:
        body, loop = small_add_body("probe"), asyncio.get_running_loop()
        end = loop.time() + limit_s
        while not self._stop.is_set() and loop.time() < end:
            started = loop.time()
            try:
                await self.raw.request("inferbus.infer.add", body, timeout=5)
            except NatsError:
                self.failed += 1
            self.longest = max(self.longest, loop.time() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PROBE_EVERY_S)

    def stop(self) -> None:
        self._stop.set()


Send = Callable[[], Awaitable[list[int | None]]]


async def under_probe(
    raw: NatsClient, pid: int, send: Send
) -> tuple[list[int | None], float, Probe, float]:
    """Run ``send`` (the bombs) while a probe runs: their codes, the seconds they took, the
    probe, and the worker's peak RSS growth in MiB."""
    probe = Probe(raw)
    probing = asyncio.create_task(probe.run())
    await asyncio.sleep(0.2)  # the probe's steady state first
    meter = PeakMeter(pid)
    started = time.monotonic()
    try:
        codes = await send()
    finally:
        took = time.monotonic() - started
        await asyncio.sleep(0.2)
        probe.stop()
        await probing
    return codes, took, probe, meter.growth_mib()


def bomb_rows(
    name: str, codes: list[int | None], took: float, probe: Probe, growth: float
) -> list[Row]:
    refused = all(code in (400, 413) for code in codes)
    shown = ", ".join(str(code) for code in codes)
    return [
        Row(name, "reply code; time to reply", f"{shown}; {took:.2f} s", "400/413; < 0.5 s",
            refused and took < 0.5),
        Row(name, "probe's longest wait (another model, every 20 ms)",
            f"{probe.longest * 1e3:.0f} ms" + (f", {probe.failed} failed" if probe.failed else ""),
            "< 250 ms", probe.longest < 0.25 and not probe.failed),
        Row(name, "worker peak RSS growth", f"{growth:.0f} MiB", "< 128 MiB", growth < 128),
    ]  # fmt: skip


async def one_bomb(raw: NatsClient, bomb: Bomb) -> list[int | None]:
    try:
        reply = await raw.request(bomb.subject, bomb.body, timeout=20)
    except NatsError:
        return [None]
    return [error_code(reply)]


async def bombs_in_chunks(raw: NatsClient, bombs: list[Bomb]) -> list[int | None]:
    sends = (send_in_chunks(raw, bomb.subject, bomb.body) for bomb in bombs)
    replies = await asyncio.gather(*sends, return_exceptions=True)
    return [None if isinstance(r, BaseException) else error_code(r) for r in replies]


async def bomb_section(repo: Path) -> list[Row]:
    rows: list[Row] = []
    with inferbus.EmbeddedServer() as server, WorkerProcess(server.url, repo) as victim:
        async with raw_connection(server.url) as raw:
            for make in BOMBS.values():
                bomb = make()
                measured = await under_probe(
                    raw, victim.pid, functools.partial(one_bomb, raw, bomb)
                )
                rows += bomb_rows(f"bomb: {bomb.name} ({len(bomb.body):,} B)", *measured)
    bombs = transfer_bombs()
    with (
        inferbus.EmbeddedServer(max_payload=8192) as server,
        WorkerProcess(server.url, repo) as victim,
    ):
        async with raw_connection(server.url) as raw:
            measured = await under_probe(
                raw, victim.pid, functools.partial(bombs_in_chunks, raw, bombs)
            )
            rows += bomb_rows("six bombs at once, in chunked transfers", *measured)
    return rows


# --- flood -------------------------------------------------------------------------------------


async def well_behaved(client: inferbus.Client, seconds: float) -> tuple[Counter[str], list[float]]:
    """One 1-row request every 50 ms for ``seconds`` (30 s budget each): outcomes by kind, and
    the latencies of those that succeeded."""
    pixels = {"pixels": np.zeros((1, 64), dtype=np.float32)}
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    async def call() -> None:
        started = time.monotonic()
        try:
            await client.infer("digits", pixels, timeout=30)
        except inferbus.RequestError as exc:
            outcomes["lost (504)" if exc.code == 504 else str(exc.code)] += 1
            return
        outcomes["ok"] += 1
        latencies.append(time.monotonic() - started)

    calls = []
    for _ in range(int(seconds / 0.05)):
        calls.append(asyncio.create_task(call()))
        await asyncio.sleep(0.05)
    _, waiting = await asyncio.wait(calls, timeout=35)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    if waiting:
        outcomes["lost (unanswered)"] = len(waiting)
    return outcomes, latencies


def flood_rows(
    rate: float, seconds: float, log: str, outcomes: Counter[str], latencies: list[float]
) -> list[Row]:
    attack = f"flood: {rate:,.0f} req/s (10x capacity) for {seconds:.0f} s"
    slow = sum("Slow Consumer" in line for line in log.splitlines())
    lost = outcomes["lost (504)"] + outcomes["lost (unanswered)"]
    p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
    shown = ", ".join(f"{kind}: {n}" for kind, n in sorted(outcomes.items()))
    return [
        Row(attack, "slow-consumer disconnects (server log)", str(slow), "0", slow == 0),
        Row(attack, "well-behaved client: lost requests", str(lost), "0", lost == 0),
        Row(attack, "well-behaved client: 404s", str(outcomes["404"]), "0", not outcomes["404"]),
        Row(attack, "well-behaved client: outcomes", shown),
        Row(attack, "well-behaved client: p99 latency", f"{p99:.2f} s", "< 30 s", p99 < 30),
    ]  # fmt: skip


async def flood_section(repo: Path, seconds: float) -> list[Row]:
    subject, body = "inferbus.infer.digits", digits_body()
    with inferbus.EmbeddedServer() as server, WorkerProcess(server.url, repo, "digits"):
        async with raw_connection(server.url) as raw:
            rate = 10 * await capacity(raw, subject, body, seconds=1.0)
        async with inferbus.connect(server.url) as client:
            floods = [
                flood(server.url, subject, body, rate=rate / 4, seconds=seconds) for _ in range(4)
            ]
            flooding = asyncio.gather(*floods)
            outcomes, latencies = await well_behaved(client, seconds)
            await flooding
        log = server.log_text()
    return flood_rows(rate, seconds, log, outcomes, latencies)


# --- the client under reply bombs --------------------------------------------------------------


async def client_section() -> list[Row]:
    attacks = {
        "three reply offers of 1 GiB at once": (offer_answer(GIB), 3),
        "a ~32 KB zstd reply inflating to 1 GiB": (
            body_answer(lambda request_id: inflating_reply(request_id, GIB)), 1),
    }  # fmt: skip
    rows = []
    with inferbus.EmbeddedServer() as server:
        async with raw_connection(server.url) as raw, inferbus.connect(server.url) as client:
            for name, (answer, calls) in attacks.items():
                meter = PeakMeter(os.getpid())
                async with EvilWorker(raw, answer):
                    results = await asyncio.gather(
                        *(client.infer("evil", ADD, timeout=5) for _ in range(calls)),
                        return_exceptions=True,
                    )
                growth = meter.growth_mib()
                kinds = ", ".join(sorted({type(r).__name__ for r in results}))
                rows.append(Row(f"client: {name}", "client peak RSS growth; outcome",
                                f"{growth:.0f} MiB; {kinds}", "< 256 MiB; PayloadTooLarge",
                                growth < 256 and kinds == "PayloadTooLarge"))  # fmt: skip
    return rows


# --- main --------------------------------------------------------------------------------------


async def run(sections: Sequence[str], flood_seconds: float) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="inferbus-hostile-") as folder:
        repo = hostile_repo(Path(folder) / "repo")
        if "poison" in sections:
            rows += await poison_rows(repo)
        if "bombs" in sections:
            rows += await bomb_section(repo)
        if "flood" in sections:
            rows += await flood_section(repo, flood_seconds)
        if "client" in sections:
            rows += await client_section()
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.hostile_check",
        description="Measure hostile traffic against a worker and a client (issue 10) and "
        "print a markdown table.",
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--append", action="store_true", help="append to --out instead")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this part (repeatable)"
    )
    parser.add_argument(
        "--flood-seconds", type=float, default=20.0, help="how long the flood lasts (20)"
    )
    parser.add_argument("--verbose", action="store_true", help="show nats-py's and our logs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:  # a poisoned nats-py logs a traceback; the table says what matters
        logging.getLogger("nats").setLevel(logging.CRITICAL)
        logging.getLogger("inferbus").setLevel(logging.CRITICAL)
    started = time.monotonic()
    rows = asyncio.run(run(args.only or SECTIONS, args.flood_seconds))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = markdown(rows, f"{stamp}, {time.monotonic() - started:.0f} s")
    print(table)
    if args.out is not None:
        with args.out.open("a" if args.append else "w") as out:
            out.write(table + ("\n" if args.append else ""))
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
