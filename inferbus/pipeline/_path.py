"""The request path of one model version, part by part: admission → scheduler → executor →
replier, and on a shared bus the tenancy gate in front (grants and quotas).

With nothing queued and an engine that runs inline, the scheduler is skipped: the request is
computed in the subscription callback, because batching could only add a task switch.
"""

from __future__ import annotations

import logging
import time

from nats.aio.msg import Msg

from inferbus.contract import reply_subject_problem, requester_account
from inferbus.errors import Overloaded, RequestError
from inferbus.pipeline._admission import Admission, Work
from inferbus.pipeline._executor import Executor
from inferbus.pipeline._replier import Replier
from inferbus.pipeline._service import EndpointRecord
from inferbus.pipeline._stats import ModelStats
from inferbus.pipeline.batching import Pending, Scheduler
from inferbus.pipeline.fair import FairBatchQueue
from inferbus.pipeline.policy import Tenancy, UserUsage
from inferbus.pipeline.transfer import Receiver, TransferBudget

log = logging.getLogger("inferbus.worker")


class RequestPath:
    """Carries admitted requests from a subscription to their answers."""

    def __init__(
        self,
        *,
        admission: Admission,
        queue: Scheduler[Work],
        executor: Executor,
        replier: Replier,
        stats: ModelStats,
        usage: UserUsage,
        tenancy: Tenancy | None,
        direct: bool,
    ) -> None:
        self.admission = admission
        self.queue = queue
        self.executor = executor
        self.replier = replier
        self.stats = stats
        self.usage = usage
        self.tenancy = tenancy
        self.direct = direct
        # Two requests of the largest size may arrive in chunks at once, one per sender; more
        # are refused (429).
        self.transfer_budget = TransferBudget(2 * admission.config.max_request_bytes, share=0.5)

    async def refused(self, user: str, model: str, reply: str, record: EndpointRecord) -> bool:
        """On a shared bus, before decoding: refuse (and answer) a request its sender may not
        make now: 403, a quota's 429, or a 429 when the sender's lane already holds its share
        of the queue (undecoded, so a flood costs the worker little)."""
        assert self.tenancy is not None
        try:
            self.tenancy.admit(user, model)
            if isinstance(self.queue, FairBatchQueue) and self.queue.lane_full(user):
                raise Overloaded("your requests already fill your share of this model's queue")
        except RequestError as exc:
            self.usage.refused(user)
            await self.replier.reply_error(reply, record, time.perf_counter_ns(), exc)
            return True
        return False

    async def receive(
        self,
        data: bytes | bytearray,
        reply: str,
        record: EndpointRecord,
        backlog: int = 0,
        user: str = "",
    ) -> None:
        """Admit one request body (a message's, or one assembled from a transfer) and compute
        it now or queue it; or answer its error at once.

        ``backlog`` is how many messages wait behind this one: under load, messages queue up
        and batches form."""
        received_ns = time.perf_counter_ns()
        replier = self.replier
        pushed_out = None
        try:
            work = await self.admission.admit(data, reply, record, received_ns, user)
            if self.tenancy is not None:
                self.tenancy.take_rows(user, work.rows)
            direct = self.direct and not backlog and not self.queue
            if not direct:
                pushed_out = self._submit(work)
        except Exception as exc:  # every request gets an answer, whatever went wrong
            if isinstance(exc, Overloaded):
                self.usage.refused(user)
            await replier.reply_error(reply, record, received_ns, exc)
            return
        replier.expect()
        if pushed_out is not None:  # a flood's newest request made room for another user's
            self.usage.refused(pushed_out.lane)
            await replier.reply(pushed_out.payload, Overloaded("queue full; retry later"))
        if direct:
            self.stats.queued(0)
            (outcome,) = await self.executor.execute(0, [work], replier.encode)
            await replier.reply(work, outcome)

    def _submit(self, work: Work) -> Pending[Work] | None:
        try:
            return self.queue.submit(work, rows=work.rows, key=work.key, lane=work.user)
        except Overloaded:
            if self.tenancy is not None:
                self.tenancy.release_rows(work.user, work.rows)
            raise

    def answered(self, work: Work) -> None:
        """The replier's hook on a shared bus: the rows leave the user's quota."""
        assert self.tenancy is not None
        self.tenancy.release_rows(work.user, work.rows)
        self.usage.answered(work.user, work.rows)

    async def consume(self, instance: int) -> None:
        """One engine instance's loop: take a batch, execute it, answer each request."""
        replier = self.replier
        while True:
            batch = await self.queue.next_batch()
            works = self._dequeued(batch)
            outcomes = await self.executor.execute(instance, works, replier.encode)
            for work, outcome in zip(works, outcomes, strict=True):
                await replier.reply(work, outcome)

    def _dequeued(self, batch: list[Pending[Work]]) -> list[Work]:
        now = time.monotonic()
        for item in batch:
            self.stats.queued(int((now - item.enqueued) * 1e9))
        return [item.payload for item in batch]

    # --- large requests, received in chunks ----------------------------------------------------

    async def accept_transfer(self, msg: Msg, record: EndpointRecord) -> None:
        """An offer of a request too large for one message: receive it, then admit it."""
        try:
            receiver = await Receiver.accept(
                self.replier.nats,
                msg,
                self.admission.config.max_request_bytes,
                budget=self.transfer_budget,
                owner=requester_account(msg.headers),
            )
        except RequestError as exc:  # already answered to the sender
            self.stats.request_done(exc.code)
            return
        self.replier.track(self._receive_transfer(receiver, record))

    async def _receive_transfer(self, receiver: Receiver, record: EndpointRecord) -> None:
        try:
            body = await receiver.wait()
        except RequestError as exc:  # abandoned or corrupt: the sender was told, if it listens
            log.warning("%s: %s", self.admission.config.name, exc)
            self.stats.request_done(exc.code)
            return
        if reply_subject_problem(receiver.reply):  # the commit's: answering could harm the bus
            self.stats.dropped()
            return  # below: the user is the offer's account, the one a large reply serves
        await self.receive(body, receiver.reply, record, 0, receiver.owner or "")
