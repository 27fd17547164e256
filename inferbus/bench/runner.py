"""The measurement loop: load generators, stable windows, client and server figures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from inferbus.contract import endpoint_name, service_subject
from inferbus.errors import BadInput, RequestError
from inferbus.pipeline.client import Client
from inferbus.pipeline.discovery import gather
from inferbus.status import derived

Sample = tuple[float, float, bool]  # completion time, latency in seconds, succeeded
_SERVER_FIELDS = ("inference_count", "execution_count", "batch_rows", "queue_ns", "compute_ns")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    model: str
    version: int | None = None
    concurrency: tuple[int, ...] = (1,)
    request_rates: tuple[float, ...] = ()  # when given: open loop at these requests/s
    poisson: bool = False
    window_s: float = 2.0
    warmup_s: float = 1.0
    stability: float = 0.10
    max_windows: int = 10
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.request_rates):
            raise BadInput("concurrency levels must be >= 1 and request rates > 0")
        if self.window_s <= 0 or self.warmup_s < 0 or self.max_windows < 3:
            raise BadInput("windows must be positive, warm-up >= 0, and max_windows >= 3")
        if not 0 < self.stability < 1:
            raise BadInput("stability is a fraction, e.g. 0.1 for 10%")

    @property
    def levels(self) -> list[tuple[Literal["concurrency", "rate"], float]]:
        if self.request_rates:
            return [("rate", rate) for rate in self.request_rates]
        return [("concurrency", float(c)) for c in self.concurrency]


@dataclass(frozen=True, slots=True)
class LevelResult:
    """One load level: the client's view and the workers' $SRV.STATS over the same windows."""

    mode: str
    level: float
    requests: int
    errors: int
    rows_per_request: int
    throughput_rps: float
    samples_per_s: float
    latency_ms: dict[str, float]
    windows: int
    stable: bool
    server: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Window:
    seconds: float
    samples: list[Sample]

    @property
    def throughput(self) -> float:
        return sum(ok for _, _, ok in self.samples) / self.seconds

    @property
    def p50(self) -> float:
        return float(np.median([lat for _, lat, _ in self.samples])) if self.samples else 0.0


def _close(values: list[float], tolerance: float) -> bool:
    mean = sum(values) / len(values)
    return mean > 0 and all(abs(v - mean) <= tolerance * mean for v in values)


def _stable(windows: list[_Window], tolerance: float) -> bool:
    return _close([w.throughput for w in windows], tolerance) and _close(
        [w.p50 for w in windows], tolerance
    )


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return dict.fromkeys(("p50", "p90", "p95", "p99", "mean", "max"), 0.0)
    ms = np.asarray(latencies_s) * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


class _Load:
    """Runs the generators of one level and hands out what completed since the last call."""

    def __init__(self, call: Callable[[], Awaitable[object]]) -> None:
        self.call = call
        self.samples: list[Sample] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False

    async def _one(self, started: float) -> None:
        try:
            await self.call()
            ok = True
        except RequestError:
            ok = False
        now = time.perf_counter()
        self.samples.append((now, now - started, ok))

    async def _caller(self) -> None:
        while not self.stopping:
            await self._one(time.perf_counter())

    async def _scheduler(self, rate: float, poisson: bool) -> None:
        rng = np.random.default_rng(0)
        due = time.perf_counter()
        while not self.stopping:
            due += rng.exponential(1 / rate) if poisson else 1 / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            # Latency counts from the scheduled time: an overloaded system shows its queue.
            self._spawn(self._one(due))

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start(self, mode: str, level: float, poisson: bool) -> None:
        if mode == "rate":
            self._spawn(self._scheduler(level, poisson))
        else:
            for _ in range(int(level)):
                self._spawn(self._caller())

    def take(self) -> list[Sample]:
        taken, self.samples = self.samples, []
        return taken

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*list(self.tasks), return_exceptions=True)


async def _server_totals(client: Client, endpoint: str, workers: int) -> dict[str, float]:
    """The workers' counters for one endpoint, summed over workers."""
    replies = await gather(client.nats, service_subject("STATS"), timeout=1.0, count=workers)
    totals = dict.fromkeys(_SERVER_FIELDS, 0.0)
    for reply in replies:
        for stats in reply.get("endpoints") or []:
            if stats.get("name") == endpoint and isinstance(stats.get("data"), dict):
                for key in _SERVER_FIELDS:
                    totals[key] += float(stats["data"].get(key, 0))
    return totals


def _server_figures(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    delta = {key: after[key] - before[key] for key in _SERVER_FIELDS}
    return {
        "inferences": delta["inference_count"],
        "executions": delta["execution_count"],
        **derived(delta),
    }


async def _measure_level(
    client: Client,
    config: BenchConfig,
    inputs: Mapping[str, np.ndarray],
    mode: str,
    level: float,
    workers: int,
) -> LevelResult:
    endpoint = endpoint_name(config.model, config.version)

    async def call() -> object:
        return await client.infer(
            config.model, inputs, version=config.version, timeout=config.timeout_s
        )

    load = _Load(call)
    load.start(mode, level, config.poisson)
    await asyncio.sleep(config.warmup_s)
    load.take()
    windows: list[_Window] = []
    totals = [await _server_totals(client, endpoint, workers)]
    started = time.perf_counter()
    while len(windows) < config.max_windows:
        await asyncio.sleep(config.window_s)
        ended = time.perf_counter()
        windows.append(_Window(ended - started, load.take()))
        totals.append(await _server_totals(client, endpoint, workers))
        started = time.perf_counter()
        if len(windows) >= 3 and _stable(windows[-3:], config.stability):
            break
    await load.stop()
    return _result(mode, level, windows[-3:], inputs, len(windows), config, totals)


def _result(
    mode: str,
    level: float,
    last: list[_Window],
    inputs: Mapping[str, np.ndarray],
    count: int,
    config: BenchConfig,
    totals: list[dict[str, float]],
) -> LevelResult:
    samples = [s for w in last for s in w.samples]
    ok = [lat for _, lat, good in samples if good]
    seconds = sum(w.seconds for w in last)
    rows = int(next(iter(inputs.values())).shape[0]) if inputs else 1
    return LevelResult(
        mode=mode,
        level=level,
        requests=len(samples),
        errors=len(samples) - len(ok),
        rows_per_request=rows,
        throughput_rps=len(ok) / seconds,
        samples_per_s=len(ok) * rows / seconds,
        latency_ms=latency_summary(ok),
        windows=count,
        stable=_stable(last, config.stability),
        server=_server_figures(totals[-4], totals[-1]),
    )


async def run_bench(
    client: Client,
    config: BenchConfig,
    inputs: Mapping[str, np.ndarray],
    on_level: Callable[[LevelResult], None] | None = None,
) -> list[LevelResult]:
    """Measure every level in turn; ``on_level`` sees each result as it is ready."""
    info = await client.describe(config.model, config.version)
    results = []
    for mode, level in config.levels:
        result = await _measure_level(client, config, inputs, mode, level, len(info.workers))
        results.append(result)
        if on_level is not None:
            on_level(result)
    return results
