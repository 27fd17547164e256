"""The bytes all request bodies in the gateway may hold at once.

Each body is bounded on its own (``max_body_bytes``), but many large ones at once could still
exhaust the gateway's memory: a body is counted against one shared budget as it arrives (its
declared length up front, when it has one), and a body that would pass the budget is refused
with 429 before more of it is read. Workers bound their transfers the same way.
"""

from __future__ import annotations

from types import TracebackType

from inferbus.errors import Overloaded

RETRY_AFTER_S = 1.0  # bodies drain in about a request's time; a second is a polite first guess


class BodyBudget:
    """``total`` bytes shared by every body being read or sent on."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0

    def holding(self) -> Holding:
        return Holding(self)

    def take(self, size: int) -> None:
        if self.held + size > self.total:
            raise Overloaded(
                f"the gateway holds {self.held} bytes of request bodies; {size} more would pass "
                f"its budget of {self.total}",
                retry_after_s=RETRY_AFTER_S,
            )
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


class Holding:
    """One request's share, given back in full when its ``with`` block ends."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def take(self, size: int) -> None:
        self.budget.take(size)
        self.size += size

    def __enter__(self) -> Holding:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.budget.give(self.size)
        self.size = 0
