"""The replier, the last part of a worker's request path: every admitted request gets exactly
one answer, counted once.

It encodes outputs (called where the engine ran, so large encodes stay off the loop),
publishes a reply as one message or, above max_payload, as a chunked transfer, answers errors
with their code, and knows when nothing admitted is left unanswered (for draining).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from nats.aio.client import Client as NatsClient

from inferbus.codecs import InferResponse, encode_response
from inferbus.contract import Tensors, error_reply
from inferbus.errors import BadInput, EngineFailure, Overloaded, RequestError
from inferbus.pipeline._admission import Work
from inferbus.pipeline._executor import Outcome, internal_error
from inferbus.pipeline._reply_server import ReplyServer
from inferbus.pipeline._service import EndpointRecord
from inferbus.pipeline._stats import ModelStats
from inferbus.repository import ModelConfig

REPLY_TRANSFER_S: Final = 60.0  # a large reply's time limit when the request set no budget

log = logging.getLogger("inferbus.worker")


class Replier:
    """Answers one model version's requests over ``nats``."""

    def __init__(
        self,
        config: ModelConfig,
        stats: ModelStats,
        nats: NatsClient,
        answered: Callable[[Work], None] | None = None,
    ) -> None:
        self.config = config
        self.answered = answered  # told of each admitted request as it is answered
        self.stats = stats
        self.nats = nats
        self._version = str(config.version)
        self._outstanding = 0  # admitted, not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[None]] = set()
        self._overloaded_error = Overloaded(
            "the worker is behind on this model; retry later", model=config.name
        )
        self._overloaded = error_reply(self._overloaded_error)

    @property
    def idle(self) -> bool:
        """Every admitted request answered, no transfer under way."""
        return self._idle.is_set() and not self._background

    def expect(self) -> None:
        """One more admitted request that must be answered before the model is idle."""
        self._outstanding += 1
        self._idle.clear()

    async def wait_idle(self) -> None:
        """Return once every admitted request and every background transfer is done."""
        while self._background or not self._idle.is_set():
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._idle.wait()

    def track(self, work: Coroutine[Any, Any, None]) -> None:
        """Run transfer work in the background; ``wait_idle`` waits for it too."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def encode(self, work: Work, outputs: Tensors) -> Outcome:
        """The reply body for computed outputs, or the error to answer instead."""
        try:
            if work.request.outputs:
                outputs = {name: outputs[name] for name in work.request.outputs}
            response = InferResponse(work.request.id, self.config.name, self._version, outputs)
            return encode_response(response, work.request.reply_codec)
        except BadInput as exc:  # the engine's output, not the caller's input, is at fault
            return EngineFailure(f"cannot encode the engine's outputs: {exc.message}")
        except Exception as exc:  # MemoryError, a codec's bug: still an answer, a 500
            return internal_error(exc, self.config.name)

    async def reply(self, work: Work, outcome: Outcome) -> None:
        """Answer an admitted request (in chunks if the reply is large)."""
        self._outstanding -= 1
        if not self._outstanding:
            self._idle.set()
        if self.answered is not None:
            self.answered(work)
        if isinstance(outcome, RequestError):
            await self.reply_error(work.reply, work.record, work.received_ns, outcome)
        elif len(outcome) > self.nats.max_payload:
            self.track(self._send_large(work, outcome))
        elif await self._publish(work.reply, outcome, None):
            self._done(work.record, work.received_ns, None)

    async def reply_error(
        self, reply: str, record: EndpointRecord, received_ns: int, exc: Exception
    ) -> None:
        """Answer with an error's code (any other exception is an internal 500)."""
        failure = exc if isinstance(exc, RequestError) else internal_error(exc, self.config.name)
        failure.model = self.config.name
        body, headers = error_reply(failure)
        if await self._publish(reply, body, headers):
            self._done(record, received_ns, failure)

    async def shed(self, reply: str, record: EndpointRecord) -> None:
        """429 for a request not even decoded: the worker is behind (the cheapest answer)."""
        if await self._publish(reply, *self._overloaded):
            self._done(record, time.perf_counter_ns(), self._overloaded_error)

    def _done(self, record: EndpointRecord, received_ns: int, error: RequestError | None) -> None:
        self.stats.request_done(None if error is None else error.code)
        record.observe(time.perf_counter_ns() - received_ns, None if error is None else str(error))

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str] | None) -> bool:
        """Publish a reply; a failure (connection lost, bad subject) is logged, never raised,
        so the consumer that publishes keeps serving the others."""
        try:
            await self.nats.publish(subject, body, headers=headers)
        except Exception as exc:  # nats-py raises several types; none may stop the consumer
            log.warning("%s: could not publish a reply to %r: %s", self.config.name, subject, exc)
            self.stats.request_done(503)
            return False
        return True

    async def _send_large(self, work: Work, body: bytes) -> None:
        """Offer a reply above max_payload, then serve its chunks to the caller's fetches
        (only to the caller's account, when known)."""
        budget = REPLY_TRANSFER_S
        if work.deadline is not None:
            budget = max(work.deadline - time.monotonic(), 1.0)
        try:
            server = ReplyServer(self.nats, body, timeout_s=budget, owner=work.user or None)
            await server.offer_to(work.reply)
        except Exception as exc:  # as _publish: logged, never raised
            log.warning("%s: could not offer a reply to %r: %s", self.config.name, work.reply, exc)
            self.stats.request_done(503)
            return
        try:
            await server.serve()
        except RequestError as exc:  # refused, abandoned or broken: nobody left to tell
            log.warning("%s: reply transfer failed: %s", self.config.name, exc)
            self.stats.request_done(exc.code)
            return
        self._done(work.record, work.received_ns, None)
