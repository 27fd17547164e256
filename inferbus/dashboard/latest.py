"""The newest value, shared: one writer publishes, any number of readers each wait for a value
newer than the one they last took. Nothing queues, so a slow reader skips values it was too
slow for instead of holding back the others or piling them up in memory."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Latest(Generic[T]):
    """``publish`` a value; ``await newer_than(n)`` the newest once its number passes ``n``
    (values are numbered from 1); ``close`` ends every wait, now and later, with None."""

    def __init__(self) -> None:
        self.value: T | None = None
        self.number = 0  # values published so far
        self.closed = False
        self._changed = asyncio.Event()  # set, then replaced, at each change

    def publish(self, value: T) -> None:
        self.value = value
        self.number += 1
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def newer_than(self, number: int) -> tuple[int, T] | None:
        """(number, value) for the newest value once it is newer than ``number``; None once
        closed."""
        while not self.closed:
            if self.number > number and self.value is not None:
                return self.number, self.value
            await self._changed.wait()
        return None

    def _wake(self) -> None:
        # waiters hold the event that was current when they began waiting: set it for them,
        # and give the next wait a fresh one
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
