"""One model version's request path on a worker.

On the event loop: decode, check, queue. On each engine instance (its own thread, or the loop
for engines faster than a thread hop): take a batch, drop expired requests, run the engine,
split and encode the outputs. Every request gets an answer, whatever goes wrong.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Coroutine, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from inferbus.codecs import (
    InferRequest,
    InferResponse,
    Tensors,
    decode_request,
    encode_error,
    encode_response,
)
from inferbus.codecs.base import get_codec
from inferbus.engines import Engine, create_engine
from inferbus.errors import (
    BadInput,
    DeadlineExceeded,
    EngineFailure,
    PayloadTooLarge,
    RequestError,
    Unavailable,
)
from inferbus.pipeline._health import Health
from inferbus.pipeline._mapping import unpack
from inferbus.pipeline._service import EndpointRecord
from inferbus.pipeline._stats import ModelStats
from inferbus.pipeline._threads import run_in_thread
from inferbus.pipeline._transfer import Receiver, TransferBudget, send
from inferbus.pipeline.batching import BatchQueue, Pending
from inferbus.pipeline.subjects import error_headers
from inferbus.repository import ModelConfig

# A hop to a thread and back costs ~160 µs here (DESIGN.md): engines faster than this run inline.
INLINE_BELOW_S: Final = 200e-6
TIMING_BATCH: Final = 64
DECODE_OFF_LOOP_BYTES: Final = 1 << 20  # larger bodies are decoded on a thread
REPLY_TRANSFER_S: Final = 60.0  # a large reply's time limit when the request set no budget

log = logging.getLogger("inferbus.worker")


@dataclass(frozen=True, slots=True)
class _Work:
    """An admitted request: what to compute, and where and by when to answer."""

    request: InferRequest
    rows: int
    deadline: float | None
    reply: str
    record: EndpointRecord
    received_ns: int


Outcome = bytes | RequestError


async def load_served_model(config: ModelConfig) -> ServedModel:
    """Create, load and warm up ``instances`` engines off the loop; choose where they run."""
    engines = [create_engine(config) for _ in range(config.instances)]
    for engine in engines:
        await run_in_thread(None, engine.load)
        await run_in_thread(None, engine.warm_up)
    inline = config.execution == "inline"
    if config.execution == "auto" and config.instances == 1:
        inline = await run_in_thread(None, _time_full_batch, engines[0]) < INLINE_BELOW_S
    where = "on the event loop" if inline else f"on {config.instances} thread(s)"
    engine = engines[0]
    log.info(
        "%s v%d loaded: %s on %s, runs %s",
        config.name, config.version, engine.backend, engine.device, where,
    )  # fmt: skip
    return ServedModel(engines, inline=inline)


def _time_full_batch(engine: Engine) -> float:
    signature = engine.signature
    # A realistic batch: max_batch_size may be huge for models that take big tensors.
    batch = min(engine.config.max_batch_size, TIMING_BATCH) if _is_batched(engine) else 1
    inputs = signature.examples(batch)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        engine(inputs)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def _is_batched(engine: Engine) -> bool:
    inputs = engine.signature.inputs
    return bool(inputs) and all(spec.shape[:1] == (-1,) for spec in inputs)


class ServedModel:
    """A model version's engine instances, batch queue and counters."""

    def __init__(self, engines: Sequence[Engine], *, inline: bool = False) -> None:
        self.engines = list(engines)
        self.config = self.engines[0].config
        self.signature = self.engines[0].signature
        self.stats = ModelStats()
        self.queue: BatchQueue[_Work] = BatchQueue(
            max_batch_size=self.config.max_batch_size,
            max_queue_delay_s=self.config.max_queue_delay_ms / 1e3,
            max_queue_size=self.config.max_queue_size,
            preferred_batch_sizes=self.config.preferred_batch_sizes,
        )
        self.executors = [
            None
            if inline
            else ThreadPoolExecutor(1, thread_name_prefix=f"inferbus-{self.config.name}-{i}")
            for i in range(len(self.engines))
        ]
        self._batched = _is_batched(self.engines[0])
        self._direct = inline and len(self.engines) == 1 and not self.config.max_queue_delay_ms
        self._output_names = frozenset(spec.name for spec in self.signature.outputs)
        self._consumers: list[asyncio.Task[None]] = []
        self._nats: NatsClient | None = None
        self.health = Health(
            hang_after_s=self.config.hang_after_s, max_failures=self.config.max_failures
        )
        self._outstanding = 0  # admitted, not yet answered
        self._transfers: set[asyncio.Task[None]] = set()
        # Two requests of the largest size may arrive in chunks at once; more wait (429).
        self._transfer_budget = TransferBudget(2 * self.config.max_request_bytes)
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self, client: NatsClient) -> None:
        """Start one consumer per engine instance (on the running loop), replying via client."""
        self._nats = client
        self._consumers = [
            asyncio.create_task(self._consume(engine, executor))
            for engine, executor in zip(self.engines, self.executors, strict=True)
        ]

    def metadata(self) -> dict[str, str]:
        """Endpoint metadata: ADR-32 allows only strings, so the signature is JSON text."""
        engine = self.engines[0]
        return {
            "model": self.config.name,
            "version": str(self.config.version),
            "engine": engine.backend or type(engine).__name__,
            "device": engine.device,
            "max_batch_size": str(self.config.max_batch_size),
            "instances": str(len(self.engines)),
            "signature": orjson.dumps(self.signature.to_dict()).decode(),
        }

    def stats_data(self) -> dict[str, Any]:
        data = self.stats.snapshot(pending=len(self.queue))
        data["health"] = "ready" if self.health.healthy else f"unhealthy: {self.health.reason}"
        return data

    async def reject_queued(self, reason: str) -> None:
        """Answer 503 to everything queued (the engine is out of rotation): callers retry
        elsewhere instead of waiting here."""
        for item in self.queue.take_all():
            await self._reply(item.payload, Unavailable(f"this worker's engine is unfit: {reason}"))

    async def probe(self) -> bool:
        """One call on example inputs, off the loop: is the engine fit again?"""
        try:
            await run_in_thread(self.executors[0], self.engines[0].warm_up)
        except Exception:  # any failure means "not yet"
            return False
        return True

    # --- on the event loop ----------------------------------------------------------------------
    # No task or future per request: the subscription callback admits a request to the queue,
    # and the consumer that computes its batch publishes its reply.

    async def admit(
        self, data: bytes | bytearray, reply: str, record: EndpointRecord, backlog: int = 0
    ) -> None:
        """Admit one request body (a message's, or one assembled from a transfer), or answer
        its error at once.

        ``backlog`` is how many messages wait behind this one. With none, an empty queue and
        an engine that runs inline, the request is computed right here: batching could only
        add a task switch. Under load messages queue up and batches form.
        """
        received_ns = time.perf_counter_ns()
        try:
            if len(data) > DECODE_OFF_LOOP_BYTES:  # decompressing 100s of MiB takes a while
                request = await run_in_thread(None, self._decode, data)
            else:
                request = self._decode(data)
            work = self._admit(request, reply, record, received_ns)
            direct = self._direct and not backlog and not self.queue
            if not direct:
                self.queue.submit(work, rows=work.rows, key=self._batch_key(work.request))
        except Exception as exc:  # every request gets an answer, whatever went wrong
            await self._reply_error(reply, record, received_ns, exc)
            return
        self._outstanding += 1
        self._idle.clear()
        if direct:
            self.stats.queued(0)
            expired = _expired(work, time.monotonic())
            outcome = _expired_error() if expired else self._run_batch(self.engines[0], [work])[0]
            await self._reply(work, outcome)

    def _decode(self, data: bytes | bytearray) -> InferRequest:
        if len(data) > self.config.max_request_bytes:
            raise PayloadTooLarge(
                f"request of {len(data)} bytes exceeds max_request_bytes "
                f"{self.config.max_request_bytes}"
            )
        return decode_request(data, self.config.max_request_bytes)

    def _admit(
        self, request: InferRequest, reply: str, record: EndpointRecord, received_ns: int
    ) -> _Work:
        rows = self._check(request)
        timeout = request.timeout_us
        deadline = None if timeout is None else time.monotonic() + timeout / 1e6
        return _Work(request, rows, deadline, reply, record, received_ns)

    async def accept_transfer(self, msg: Msg, record: EndpointRecord) -> None:
        """An offer of a request too large for one message: receive it, then admit it."""
        try:
            limit = self.config.max_request_bytes
            receiver = await Receiver.accept(
                self._client(), msg, limit, needs_reply=True, budget=self._transfer_budget
            )
        except RequestError as exc:  # already answered to the sender
            self.stats.request_done(exc.code)
            return
        self._track(self._receive(receiver, record))

    async def _receive(self, receiver: Receiver, record: EndpointRecord) -> None:
        try:
            body = await receiver.wait()
        except RequestError as exc:  # abandoned or corrupt: the sender was told, if it listens
            log.warning("%s: %s", self.config.name, exc)
            self.stats.request_done(exc.code)
            return
        await self.admit(body, receiver.offer.reply, record)

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        """Run transfer work in the background; drain waits for it like for queued requests."""
        task = asyncio.create_task(work)
        self._transfers.add(task)
        task.add_done_callback(self._transfers.discard)

    async def _reply(self, work: _Work, outcome: Outcome) -> None:
        """Publish a computed outcome (in chunks if it is large) and count it as done."""
        self._outstanding -= 1
        if not self._outstanding:
            self._idle.set()
        if isinstance(outcome, bytes) and len(outcome) > self._client().max_payload:
            self._track(self._send_large(work, outcome))
        elif isinstance(outcome, bytes):
            if await self._publish(work.reply, outcome, None):
                self.stats.request_done(None)
                work.record.observe(time.perf_counter_ns() - work.received_ns)
        else:
            await self._reply_error(work.reply, work.record, work.received_ns, outcome)

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str] | None) -> bool:
        """Publish a reply; a failure (connection lost, bad subject) is logged, never raised,
        so the consumer that publishes keeps serving the others."""
        try:
            await self._client().publish(subject, body, headers=headers)
        except Exception as exc:  # nats-py raises several types; none may stop the consumer
            log.warning("%s: could not publish a reply to %r: %s", self.config.name, subject, exc)
            self.stats.request_done(503)
            return False
        return True

    async def _send_large(self, work: _Work, body: bytes) -> None:
        budget = REPLY_TRANSFER_S
        if work.deadline is not None:
            budget = max(work.deadline - time.monotonic(), 1.0)
        try:
            await send(self._client(), work.reply, body, timeout=budget)
        except RequestError as exc:  # the caller gave up or went away: nobody left to tell
            log.warning("%s: reply transfer failed: %s", self.config.name, exc)
            self.stats.request_done(exc.code)
            return
        self.stats.request_done(None)
        work.record.observe(time.perf_counter_ns() - work.received_ns)

    async def _reply_error(
        self, reply: str, record: EndpointRecord, received_ns: int, exc: Exception
    ) -> None:
        failure = exc if isinstance(exc, RequestError) else _internal(exc, self.config.name)
        failure.model = self.config.name
        body = encode_error(failure.message)
        if not await self._publish(reply, body, error_headers(failure)):
            return
        self.stats.request_done(failure.code)
        record.observe(time.perf_counter_ns() - received_ns, str(failure))

    def _client(self) -> NatsClient:
        if self._nats is None:
            raise RuntimeError("ServedModel.start() was not called")
        return self._nats

    async def wait_idle(self) -> None:
        """Return once every admitted request and every transfer has been answered."""
        while self._transfers or not self._idle.is_set():
            await asyncio.gather(*self._transfers, return_exceptions=True)
            await self._idle.wait()

    def _check(self, request: InferRequest) -> int:
        """Validate against the signature; the request's batch size in rows."""
        self.signature.check_inputs(request.inputs)
        unknown = set(request.outputs) - self._output_names
        if unknown:
            raise BadInput(f"unknown outputs {sorted(unknown)}; has {sorted(self._output_names)}")
        if request.reply_codec is not None:
            codec = get_codec(request.reply_codec)
            for spec in self.signature.outputs:  # fail now, not after computing
                if not request.outputs or spec.name in request.outputs:
                    codec.check(spec.datatype, tuple(max(dim, 1) for dim in spec.shape))
        if not self._batched:
            return 1
        sizes = {array.shape[0] for array in request.inputs.values()}
        if len(sizes) != 1:
            raise BadInput(f"inputs disagree on the batch size: {sorted(sizes)}")
        rows: int = sizes.pop()
        if rows > self.config.max_batch_size:
            raise PayloadTooLarge(
                f"batch of {rows} exceeds max_batch_size {self.config.max_batch_size}"
            )
        return rows

    def _batch_key(self, request: InferRequest) -> Hashable:
        """Requests batch together when everything but their first dimension matches."""
        if not self._batched:
            return object()  # unbatched models run each request alone
        shapes = sorted((name, array.shape[1:]) for name, array in request.inputs.items())
        return tuple(shapes), request.outputs

    async def _consume(self, engine: Engine, executor: ThreadPoolExecutor | None) -> None:
        while True:
            batch = await self.queue.next_batch()
            works = await self._drop_expired(batch)
            if not works:
                continue
            self.health.started()
            try:
                if executor is None:
                    outcomes = self._run_batch(engine, works)
                else:
                    outcomes = await run_in_thread(executor, self._run_batch, engine, works)
            except Exception as exc:  # a bug of ours must not kill the consumer or lose replies
                outcomes = [_internal(exc, self.config.name)] * len(works)
            self.health.finished(all(isinstance(o, EngineFailure) for o in outcomes))
            for work, outcome in zip(works, outcomes, strict=True):
                await self._reply(work, outcome)

    async def _drop_expired(self, batch: list[Pending[_Work]]) -> list[_Work]:
        """Answer 504 for requests whose budget ran out while queued; the rest go on."""
        now = time.monotonic()
        live = []
        for item in batch:
            self.stats.queued(int((now - item.enqueued) * 1e9))
            work = item.payload
            if _expired(work, now):
                await self._reply(work, _expired_error())
            else:
                live.append(work)
        return live

    # --- on the engine's thread (or inline) -----------------------------------------------------

    def _run_batch(self, engine: Engine, works: list[_Work]) -> list[Outcome]:
        """Run a batch; if it fails, run its requests one by one so only the bad one fails."""
        try:
            per_request = self._infer(engine, works)
        except Exception as exc:  # a RequestError, or a bug in an engine's hooks
            if len(works) == 1:
                return [
                    exc if isinstance(exc, RequestError) else _internal(exc, engine.config.name)
                ]
            return [self._run_batch(engine, [work])[0] for work in works]
        return [
            self._encode(work, outputs) for work, outputs in zip(works, per_request, strict=True)
        ]

    def _infer(self, engine: Engine, works: list[_Work]) -> Sequence[Tensors]:
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
        return per_request

    def _encode(self, work: _Work, outputs: Tensors) -> Outcome:
        try:
            return self._encode_checked(work, outputs)
        except Exception as exc:  # MemoryError, a codec's bug: still an answer, a 500
            return _internal(exc, self.config.name)

    def _encode_checked(self, work: _Work, outputs: Tensors) -> Outcome:
        if work.request.outputs:
            outputs = {name: outputs[name] for name in work.request.outputs}
        version = str(self.config.version)
        response = InferResponse(work.request.id, self.config.name, version, dict(outputs))
        try:
            return encode_response(response, work.request.reply_codec)
        except BadInput as exc:  # the engine's output, not the caller's input, is at fault
            return EngineFailure(f"cannot encode the engine's outputs: {exc.message}")

    async def close(self) -> None:
        for consumer in self._consumers:
            consumer.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        left = self.queue.take_all()  # empty after a drain; not empty only if start failed
        if left:
            log.warning("%s: %d queued requests dropped at close", self.config.name, len(left))
        for executor in self.executors:
            if executor is not None:
                executor.shutdown(wait=True)
        for engine in self.engines:
            engine.close()


def _call_engine(engine: Engine, inputs: Tensors) -> Tensors:
    try:
        return engine(inputs)
    except RequestError:
        raise
    except Exception as exc:  # a user's hook or a backend: the caller gets a 500, we a log
        log.exception("%s: engine failed", engine.config.name)
        raise EngineFailure(f"{type(exc).__name__}: {exc}") from exc


def _expired(work: _Work, now: float) -> bool:
    return work.deadline is not None and now >= work.deadline


def _expired_error() -> DeadlineExceeded:
    return DeadlineExceeded("the time budget ran out before compute; the engine was skipped")


def _internal(exc: Exception, model: str) -> EngineFailure:
    log.exception("%s: unexpected error while serving a request", model)
    return EngineFailure(f"internal error: {type(exc).__name__}: {exc}")
