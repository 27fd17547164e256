"""Benchmark results as a table on screen, JSON or CSV."""

from __future__ import annotations

import csv
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from inferbus.bench.runner import BenchConfig, LevelResult

_COLUMNS = (
    ("level", 9), ("req/s", 9), ("samples/s", 10), ("p50 ms", 8), ("p90 ms", 8), ("p95 ms", 8),
    ("p99 ms", 8), ("queue ms", 9), ("compute ms", 11), ("batch", 6), ("errors", 7), ("stable", 6),
)  # fmt: skip


def _cells(result: LevelResult) -> list[str]:
    level = f"{result.level:g}" + ("/s" if result.mode == "rate" else "")
    lat, server = result.latency_ms, result.server
    return [
        level,
        f"{result.throughput_rps:,.0f}",
        f"{result.samples_per_s:,.0f}",
        *(f"{lat[p]:.2f}" for p in ("p50", "p90", "p95", "p99")),
        f"{server.get('queue_ms', 0):.2f}",
        f"{server.get('compute_ms', 0):.2f}",
        f"{server.get('mean_batch_size', 0):.1f}",
        str(result.errors),
        "yes" if result.stable else "no",
    ]


def header() -> str:
    return "  ".join(name.rjust(width) for name, width in _COLUMNS)


def row(result: LevelResult) -> str:
    return "  ".join(c.rjust(w) for c, (_, w) in zip(_cells(result), _COLUMNS, strict=True))


def table(results: Sequence[LevelResult]) -> str:
    return "\n".join([header(), *(row(r) for r in results)])


def document(config: BenchConfig, results: Sequence[LevelResult]) -> dict[str, Any]:
    return {
        "model": config.model,
        "version": config.version,
        "config": asdict(config),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": [r.to_dict() for r in results],
    }


def write_json(path: Path, config: BenchConfig, results: Sequence[LevelResult]) -> None:
    path.write_bytes(orjson.dumps(document(config, results), option=orjson.OPT_INDENT_2))


def write_csv(path: Path, results: Sequence[LevelResult]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["mode", "level", "requests", "errors", "rows_per_request", "throughput_rps",
             "samples_per_s", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
             "server_queue_ms", "server_compute_ms", "server_mean_batch_size", "stable"]
        )  # fmt: skip
        for r in results:
            lat, server = r.latency_ms, r.server
            writer.writerow(
                [r.mode, r.level, r.requests, r.errors, r.rows_per_request, r.throughput_rps,
                 r.samples_per_s, lat["p50"], lat["p90"], lat["p95"], lat["p99"], lat["mean"],
                 server.get("queue_ms"), server.get("compute_ms"),
                 server.get("mean_batch_size"), r.stable]
            )  # fmt: skip
