"""Dynamic batching: one small asyncio primitive.

Requests wait in a bounded queue; an idle engine instance takes the oldest compatible ones,
up to ``max_batch_size`` rows, after waiting at most ``max_queue_delay`` for more (or at once
when a preferred batch size is reached). A full queue refuses with ``Overloaded`` (429).
``Scheduler`` is the interface the worker uses; ``fair.FairBatchQueue`` implements it with a
lane per user for shared buses.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, Self, TypeVar

from inferbus.errors import Overloaded
from inferbus.repository import ModelConfig

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Pending(Generic[T]):
    """One request waiting for a batch: its payload, its size in rows and when it arrived."""

    payload: T
    rows: int
    key: Hashable
    lane: str = ""  # whose request (shared buses); "" on a single-tenant worker
    enqueued: float = field(default_factory=time.monotonic)


class Scheduler(Protocol[T]):
    """Where admitted requests wait for an engine instance."""

    def __len__(self) -> int: ...

    def submit(self, payload: T, *, rows: int, key: Hashable, lane: str = "") -> Pending[T] | None:
        """Queue a request; a request returned was pushed out (answer it 429)."""

    async def next_batch(self) -> list[Pending[T]]: ...

    def take_all(self) -> list[Pending[T]]: ...


class Batcher(ABC, Generic[T]):
    """What every scheduler shares: the limits, and waiting for a batch (at once when the
    waiting rows fill one or match a preferred size, else once the oldest waited
    ``max_queue_delay_s``). Subclasses keep the requests and pick each batch."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 1024,
        preferred_batch_sizes: tuple[int, ...] = (),
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.preferred = frozenset(preferred_batch_sizes)
        self._arrived = asyncio.Event()
        self._collecting = asyncio.Lock()  # one instance gathers a batch at a time
        self._empty()

    @abstractmethod
    def _empty(self) -> None:
        """Start (or start again) with nothing waiting."""

    @classmethod
    def for_config(cls, config: ModelConfig) -> Self:
        """A model version's queue, with the limits its config sets."""
        return cls(
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1e3,
            max_queue_size=config.max_queue_size,
            preferred_batch_sizes=config.preferred_batch_sizes,
        )

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _oldest(self) -> float:
        """When the longest-waiting request was queued."""

    @abstractmethod
    def _ready(self) -> bool:
        """Do the waiting requests fill a batch (or a preferred size) already?"""

    @abstractmethod
    def _take(self) -> list[Pending[T]]:
        """Remove and return the next batch (one request at least)."""

    async def next_batch(self) -> list[Pending[T]]:
        """Wait for work, then return the next batch (one request at least)."""
        async with self._collecting:
            while not len(self):
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._oldest() + self.max_queue_delay_s
            while (wait := deadline - time.monotonic()) > 0 and not self._ready():
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except TimeoutError:
                    break
            return self._take()


class BatchQueue(Batcher[T]):
    """Collects ``Pending`` requests into batches of compatible ``key`` (same trailing shapes)."""

    def _empty(self) -> None:
        self._pending: deque[Pending[T]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def _oldest(self) -> float:
        return self._pending[0].enqueued

    def submit(self, payload: T, *, rows: int, key: Hashable, lane: str = "") -> Pending[T] | None:
        """Queue one request, or refuse it with ``Overloaded`` when the queue is full."""
        if len(self._pending) >= self.max_queue_size:
            raise Overloaded(f"queue full ({self.max_queue_size} requests waiting); retry later")
        self._pending.append(Pending(payload, rows, key, lane))
        self._arrived.set()
        return None

    def _compatible_rows(self) -> int:
        key = self._pending[0].key
        return sum(p.rows for p in self._pending if p.key == key)

    def _ready(self) -> bool:
        rows = self._compatible_rows()
        return rows >= self.max_batch_size or rows in self.preferred

    def _take(self) -> list[Pending[T]]:
        """The oldest request and the compatible ones after it, up to max_batch_size rows."""
        first = self._pending.popleft()
        batch, rows, kept = [first], first.rows, deque[Pending[T]]()
        while self._pending:
            item = self._pending.popleft()
            if rows >= self.max_batch_size:
                kept.append(item)
                kept.extend(self._pending)
                break
            if item.key == first.key and rows + item.rows <= self.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._pending = kept
        return batch

    def take_all(self) -> list[Pending[T]]:
        """Empty the queue (the model is shutting down) and return what was waiting."""
        taken = list(self._pending)
        self._pending.clear()
        return taken
