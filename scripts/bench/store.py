"""Time from deploy to first answer through the model store, for a small and a large model.

    python -m scripts.bench.store

An embedded nats-server with JetStream and one worker following the store (in this process).
For each model: pack, upload, record the deployment (what `inferbus deploy` does), then the
first request; it finds no worker, asks the store (load on demand), and is sent again once the
worker has fetched, checked, unpacked, loaded and warmed up the model. Then the same again
with the archive already in the worker's cache (a worker restart).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import inferbus
from inferbus.store.archive import pack
from inferbus.store.client import Store
from inferbus.store.reconcile import StoreSettings
from inferbus.store.records import Deployment
from scripts.bench import harness


def model(folder: Path, megabytes: int) -> Path:
    """y = x + w[0]: an ONNX file carrying ``megabytes`` of weights."""
    folder.mkdir(parents=True)
    weights = np.zeros((megabytes * 262_144 // 4, 4), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "zero"], ["row"]),
         helper.make_node("Add", ["x", "row"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weights, "w"),
         numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(folder / "model.onnx"))  # fmt: skip
    (folder / "config.toml").write_text("max_batch_size = 8\n")
    return folder


async def first_answer(url: str, store: Store, folder: Path, name: str, cache: Path) -> float:
    x = np.zeros((1, 4), np.float32)
    options = inferbus.ConnectOptions(servers=[url], name="store-bench-worker")
    settings = StoreSettings(cache_dir=cache, device="cpu", max_models=2)
    async with inferbus.Worker([], options, store=settings), inferbus.connect(url) as client:
        started = time.monotonic()
        archive = await asyncio.to_thread(pack, folder, folder.parent / f"{name}.tar")
        await store.upload(archive)
        await store.put(Deployment(name, 1, archive.sha256, archive.size))
        await client.infer(name, {"x": x}, timeout=120)
        took = time.monotonic() - started
        await store.delete(name)
        return took


async def main() -> None:
    print(f"machine: {harness.machine()}")
    print("| model | archive | deploy to first answer | again, archive cached on the worker |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="inferbus-store-bench-") as scratch:
        root = Path(scratch)
        with inferbus.EmbeddedServer(jetstream=True, store_dir=root / "js") as server:
            async with inferbus.connect(server.url) as admin:
                store = await Store.open(admin.nats)
                for megabytes in (1, 100):
                    folder = model(root / f"m{megabytes}", megabytes)
                    name = f"bench{megabytes}"
                    cold = await first_answer(server.url, store, folder, name, root / "cache")
                    warm = await first_answer(server.url, store, folder, name, root / "cache")
                    size = (folder / "model.onnx").stat().st_size / 2**20
                    print(f"| {megabytes} MiB of weights | {size:.0f} MiB | {cold:.2f} s | "
                          f"{warm:.2f} s |", flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
