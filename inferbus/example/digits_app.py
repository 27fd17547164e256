"""The example application end: classify handwritten digits through an inferbus cluster.

The worker serves only the network (``examples/models/digits``); this program does the image
pre-processing (0..16 pixel counts to floats in 0..1) and the label post-processing (argmax).

    python examples/digits_app.py --servers nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import inferbus
from inferbus.pipeline.client import InferResult

HERE = Path(__file__).parent


class DigitsClassifier(inferbus.Model[np.ndarray, np.ndarray]):
    """8x8 digit images (uint8, 0..16) in, predicted labels out."""

    name = "digits"

    def preprocess(self, images: np.ndarray) -> dict[str, np.ndarray]:
        pixels = images.reshape(len(images), 64).astype(np.float32) / 16.0
        return {"pixels": pixels}

    def postprocess(self, outputs: InferResult) -> np.ndarray:
        return np.asarray(outputs["logits"].argmax(axis=1))


@dataclass(frozen=True, slots=True)
class Report:
    predictions: np.ndarray
    local_predictions: np.ndarray
    labels: np.ndarray
    latencies_s: np.ndarray
    elapsed_s: float
    concurrency: int

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean())

    @property
    def local_accuracy(self) -> float:
        return float((self.local_predictions == self.labels).mean())

    def table(self) -> str:
        agree = int((self.predictions == self.local_predictions).sum())
        p50, p99 = np.percentile(self.latencies_s * 1e3, [50, 99])
        rows = [
            ("requests", f"{len(self.labels)} (one image each, concurrency {self.concurrency})"),
            ("accuracy, remote", f"{self.accuracy:.4f}"),
            ("accuracy, local", f"{self.local_accuracy:.4f}  (same ONNX file in-process)"),
            ("agreement", f"{agree}/{len(self.labels)} predictions identical"),
            ("throughput", f"{len(self.labels) / self.elapsed_s:,.0f} requests/s"),
            ("latency p50", f"{p50:.2f} ms"),
            ("latency p99", f"{p99:.2f} ms"),
        ]
        return "\n".join(f"{name:<18}{value}" for name, value in rows)


def local_predictions(repo: Path, images: np.ndarray) -> np.ndarray:
    """The same model run in this process: the reference the remote result must equal."""
    from inferbus.engines import create_engine  # the model end's library, only for this check

    engine = create_engine(inferbus.load_model_config(repo / "digits"))
    engine.load()
    pixels = images.reshape(len(images), 64).astype(np.float32) / 16.0
    return np.asarray(engine({"pixels": pixels})["logits"].argmax(axis=1))


async def classify(servers: str, repo: Path, data: Path, concurrency: int = 8) -> Report:
    with np.load(data, allow_pickle=False) as held_out:
        images, labels = held_out["images"], held_out["labels"]
    latencies = np.zeros(len(images))
    predictions = np.zeros(len(images), dtype=np.int64)
    gate = asyncio.Semaphore(concurrency)
    async with inferbus.connect(servers) as client:
        model = DigitsClassifier(client)

        async def one(index: int) -> None:
            async with gate:
                started = time.perf_counter()
                predictions[index] = (await model(images[index : index + 1]))[0]
                latencies[index] = time.perf_counter() - started

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(images))))
        elapsed = time.perf_counter() - started
    local = local_predictions(repo, images)
    return Report(predictions, local, labels, latencies, elapsed, concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--servers", default="nats://127.0.0.1:4222", help="NATS server URL(s)")
    parser.add_argument("--repo", type=Path, default=HERE / "models", help="model repository")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "digits_heldout.npz")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    args = parser.parse_args(argv)
    report = asyncio.run(classify(args.servers, args.repo, args.data, args.concurrency))
    print("\ninferbus digits demo: held-out digits classified over NATS\n" + report.table())
    ok = report.accuracy >= 0.95 and report.accuracy == report.local_accuracy
    print("\nresult: OK" if ok else "\nresult: FAILED (accuracy below 0.95 or differs from local)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
