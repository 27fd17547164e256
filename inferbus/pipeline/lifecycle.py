"""One ``async with`` shape for everything that starts and stops."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Collection
from types import TracebackType
from typing import Any, Final, Self

CANCEL_RETRY_S: Final = 0.05


class AsyncResource(ABC):
    """``async with`` runs ``start``; leaving runs ``stop``, also when ``start`` failed half-way."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def cancel_and_wait(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended.

    Cancelled again until it ends: on Python 3.11, ``asyncio.wait_for`` can swallow a
    cancellation that arrives just as what it waits for completes, and a loop around it would
    then run on for ever.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)
