"""Is a model's engine fit to take requests? A call that runs too long (hung) or too many
failures in a row take it out of rotation; it comes back when the call returns or a probe
succeeds after a pause."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Health:
    hang_after_s: float = 30.0
    max_failures: int = 5
    cool_down_s: float = 5.0
    busy_since: float | None = None
    failures_in_a_row: int = 0
    unhealthy_since: float | None = field(default=None)
    reason: str = ""

    @property
    def healthy(self) -> bool:
        return not self.reason

    def started(self) -> None:
        self.busy_since = time.monotonic()

    def finished(self, failed: bool) -> None:
        self.busy_since = None
        self.failures_in_a_row = self.failures_in_a_row + 1 if failed else 0

    def take_out(self, reason: str, now: float) -> None:
        self.reason, self.unhealthy_since = reason, now

    def put_back(self) -> None:
        self.reason, self.unhealthy_since = "", None
        self.failures_in_a_row = 0

    def blame_inputs(self) -> None:
        """The engine passed its probe: the failures were the requests', not its own."""
        self.failures_in_a_row = 0

    def verdict(self, now: float) -> str:
        """Why the engine is unfit now, or "" when it is fit."""
        if self.busy_since is not None and now - self.busy_since > self.hang_after_s:
            return f"engine call running for {now - self.busy_since:.0f}s (hung?)"
        if self.failures_in_a_row >= self.max_failures:
            return f"{self.failures_in_a_row} engine failures in a row"
        return ""

    def may_probe(self, now: float) -> bool:
        """After failures, try again once the pause is over (a hang clears by itself)."""
        return (
            self.busy_since is None
            and self.unhealthy_since is not None
            and now - self.unhealthy_since >= self.cool_down_s
        )
