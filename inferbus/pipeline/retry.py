"""When and how the client tries a request again: inference is idempotent, so a request that
met no worker, a full queue, a worker that went away or one that never answered may be sent
again — always within the caller's time budget, never beyond it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from inferbus.errors import (
    DeadlineExceeded,
    InferbusError,
    ModelNotFound,
    Overloaded,
    RequestError,
    Unavailable,
)

T = TypeVar("T")
log = logging.getLogger("inferbus.client")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed attempt is tried again, always within the caller's budget.

    A 429 (a worker shed the request at once) and an attempt that got no reply at all (a
    worker that died, or dropped the request while overloaded) are tried again for as long as
    the budget lasts; a 503 and "no responders" at most ``max_attempts`` times in all, the
    latter only during ``not_found_grace_s`` (a worker restarting), so a model nobody serves
    still fails fast. Waits grow from ``backoff_s`` to ``max_backoff_s``, jittered; a 429
    that says when to come back (a quota's ``retry_after_ms``) is tried again no sooner, and
    not at all when that is past the budget.
    """

    max_attempts: int = 3
    backoff_s: float = 0.02
    max_backoff_s: float = 1.0
    not_found_grace_s: float = 0.25
    #: an attempt of a model whose latency is known waits at least this long for its reply
    min_attempt_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise InferbusError("max_attempts >= 1 and 0 <= backoff_s <= max_backoff_s")
        if self.min_attempt_s <= 0:
            raise InferbusError("min_attempt_s must be positive")

    def delay(self, attempt: int) -> float:
        """Full jitter (AWS's advice): uniform in [0, capped exponential]."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))

    def attempt_timeout(self, remaining: float, typical: float | None) -> float:
        """How long one attempt may wait for its reply.

        Four times what this model usually takes, and at least ``min_attempt_s``: a reply that
        has not come by then was most likely lost with a worker or dropped by an overloaded
        one, and the next attempt may find another. With no history yet, the whole budget
        (nothing says how slow the model is).
        """
        if typical is None:
            return remaining
        return min(remaining, max(4 * typical + 0.05, self.min_attempt_s))

    def should_retry(self, error: RequestError, attempt: int, elapsed: float) -> bool:
        if isinstance(error, Overloaded):
            return True  # a busy worker answered at once: try again while the budget lasts
        if isinstance(error, DeadlineExceeded):
            return error.silent  # no reply at all; a worker's own 504 means the budget is gone
        if attempt >= self.max_attempts:
            return False
        if isinstance(error, ModelNotFound):
            return elapsed < self.not_found_grace_s
        return isinstance(error, Unavailable)

    async def run(
        self,
        attempt: Callable[[int], Awaitable[T]],
        *,
        started: float,
        deadline: float,
        label: str,
    ) -> T:
        """``attempt(1)``, then again after each failure this policy retries, while the
        budget (``deadline``, on the ``time.monotonic`` clock) allows."""
        for number in itertools.count(1):
            try:
                return await attempt(number)
            except RequestError as exc:
                now = time.monotonic()
                wait = max(self.delay(number), exc.retry_after_s or 0.0)
                if now + wait >= deadline or not self.should_retry(exc, number, now - started):
                    raise
                log.info("%s: attempt %d failed (%s); retrying in %.0f ms", label, number, exc,
                         wait * 1e3)  # fmt: skip
                await asyncio.sleep(wait)
        raise AssertionError("unreachable: itertools.count never ends")
