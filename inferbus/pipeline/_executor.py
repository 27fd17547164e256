"""The executor, the third part of a worker's request path: runs admitted work on an engine.

Each engine instance runs on its own thread, or inline on the event loop when it is faster
than a hop to a thread. ``execute`` is the one way work reaches an engine, for requests
computed at once and for queued batches alike: it skips expired requests (504), tells
``Health`` when a call starts and ends, and when a batch fails runs its requests one by one so
that only the bad one fails.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np

from inferbus.contract import Tensors
from inferbus.engines import Engine
from inferbus.errors import DeadlineExceeded, EngineFailure, RequestError
from inferbus.pipeline._admission import Work, is_batched
from inferbus.pipeline._health import Health
from inferbus.pipeline._stats import ModelStats
from inferbus.pipeline._threads import run_in_thread
from inferbus.pipeline.mapping import unpack
from inferbus.pipeline.policy import UserUsage

# A hop to a thread and back costs ~160 µs here (DESIGN.md): engines faster than this run inline.
INLINE_BELOW_S: Final = 200e-6
TIMING_BATCH: Final = 64

log = logging.getLogger("inferbus.worker")

Outcome = bytes | RequestError  # an encoded reply, or the error to answer
Encode = Callable[[Work, Tensors], Outcome]  # the replier's, run where the engine ran


class Executor:
    """A model version's engine instances and where each runs."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        inline: bool,
        stats: ModelStats,
        health: Health,
        usage: UserUsage | None = None,
    ) -> None:
        self.engines = list(engines)
        self.usage = usage  # per-user compute time, on a shared bus
        self.inline = inline
        self.stats = stats
        self.health = health
        name = self.engines[0].config.name
        self.threads = [
            None if inline else ThreadPoolExecutor(1, thread_name_prefix=f"inferbus-{name}-{i}")
            for i in range(len(self.engines))
        ]
        self._output_names = frozenset(spec.name for spec in self.engines[0].signature.outputs)

    async def execute(self, instance: int, works: list[Work], encode: Encode) -> list[Outcome]:
        """One outcome per work item, in order: 504 for those out of time, the rest computed."""
        now = time.monotonic()
        if not any(work.expired(now) for work in works):  # the usual case, kept cheap
            return await self._compute(instance, works, encode)
        live = [work for work in works if not work.expired(now)]
        computed = iter(await self._compute(instance, live, encode) if live else [])
        return [_expired() if work.expired(now) else next(computed) for work in works]

    async def _compute(self, instance: int, works: list[Work], encode: Encode) -> list[Outcome]:
        engine, thread = self.engines[instance], self.threads[instance]
        self.health.started()
        try:
            if thread is None:  # inline: no await, so no task switch on the hot path
                computed = self._run(engine, works, encode)
            else:
                computed = await run_in_thread(thread, self._run, engine, works, encode)
        except Exception as exc:  # a bug of ours must not kill the caller or lose replies
            computed = [internal_error(exc, engine.config.name)] * len(works)
        self.health.finished(all(isinstance(o, EngineFailure) for o in computed))
        return computed

    async def probe(self) -> bool:
        """One call on example inputs where the engine runs: is it fit?"""
        try:
            if self.threads[0] is None:  # inline: faster than a thread hop, by measurement
                self.engines[0].warm_up()
            else:
                await run_in_thread(self.threads[0], self.engines[0].warm_up)
        except Exception:  # any failure means "not yet"
            return False
        return True

    def close(self) -> None:
        for thread in self.threads:
            if thread is not None:
                thread.shutdown(wait=True)
        for engine in self.engines:
            engine.close()

    # --- on the engine's thread (or inline) -----------------------------------------------------

    def _run(self, engine: Engine, works: list[Work], encode: Encode) -> list[Outcome]:
        """Run a batch; if it fails, run its requests one by one so only the bad one fails."""
        try:
            per_request = self._infer(engine, works)
        except Exception as exc:  # a RequestError, or a bug in an engine's hooks
            if len(works) == 1:
                return [
                    exc
                    if isinstance(exc, RequestError)
                    else internal_error(exc, engine.config.name)
                ]
            return [self._run(engine, [work], encode)[0] for work in works]
        return [encode(work, outputs) for work, outputs in zip(works, per_request, strict=True)]

    def _infer(self, engine: Engine, works: list[Work]) -> Sequence[Tensors]:
        if len(works) == 1:
            inputs = works[0].request.inputs
        else:
            names = works[0].request.inputs.keys()
            inputs = {n: np.concatenate([w.request.inputs[n] for w in works]) for n in names}
        started = time.perf_counter_ns()
        outputs = _call_engine(engine, inputs)
        elapsed = time.perf_counter_ns() - started
        missing = self._output_names - outputs.keys()
        if missing:
            raise EngineFailure(f"the engine did not return outputs {sorted(missing)}")
        rows = [work.rows for work in works]
        per_request = [outputs] if len(works) == 1 else unpack(outputs, rows)
        # Counted only once the outputs are usable: a failed batch is retried one by one.
        self.stats.executed(len(works), sum(rows), elapsed)
        if self.usage is not None:
            self.usage.computed([(work.user, work.rows) for work in works], elapsed)
        return per_request


async def load_engines(instances: list[Engine]) -> None:
    """Load and warm up each instance, off the loop; if one fails, close all of them."""
    tried: list[Engine] = []
    try:
        for engine in instances:
            tried.append(engine)
            await run_in_thread(None, engine.load)
            await run_in_thread(None, engine.warm_up)
    except BaseException:
        for engine in tried:  # what the loaded ones hold (GPU memory) goes back now
            with contextlib.suppress(Exception):
                engine.close()
        raise


def runs_inline(engine: Engine) -> bool:
    """Is a full batch faster than a hop to a thread and back? (blocking; call on a thread)"""
    signature = engine.signature
    # A realistic batch: max_batch_size may be huge for models that take big tensors.
    batch = min(engine.config.max_batch_size, TIMING_BATCH) if is_batched(signature) else 1
    inputs = signature.examples(batch)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        engine(inputs)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) < INLINE_BELOW_S


def _call_engine(engine: Engine, inputs: Tensors) -> Tensors:
    try:
        return engine(inputs)
    except RequestError:
        raise
    except Exception as exc:  # a user's hook or a backend: the caller gets a 500, we a log
        log.exception("%s: engine failed", engine.config.name)
        raise EngineFailure(f"{type(exc).__name__}: {exc}") from exc


def _expired() -> DeadlineExceeded:
    return DeadlineExceeded("the time budget ran out before compute; the engine was skipped")


def internal_error(exc: Exception, model: str) -> EngineFailure:
    log.exception("%s: unexpected error while serving a request", model)
    return EngineFailure(f"internal error: {type(exc).__name__}: {exc}")
