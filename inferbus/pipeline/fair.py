"""Fair batching for a shared bus: ``BatchQueue``'s interface with a lane per user.

Each batch is filled by deficit round-robin over the lanes, counted in rows: every turn gives
each waiting user a quantum of rows (``max_batch_size`` over the number of waiting users), so
a user who floods the worker gets no more of each batch than one who sends a request now and
then, and batches still fill when only one user is waiting. The lane that opened a batch goes
to the back of the line for the next. When the queue is full, a newcomer pushes out the newest
request of the user holding the most (answered 429), unless the newcomer is that user: a flood
fills only its own share of the queue.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable
from typing import TypeVar

from inferbus.errors import Overloaded
from inferbus.pipeline.batching import Batcher, Pending

T = TypeVar("T")


class FairBatchQueue(Batcher[T]):
    """Per-user lanes, one batch at a time, deficit round-robin by rows."""

    def _empty(self) -> None:
        self._lanes: dict[str, deque[Pending[T]]] = {}  # only lanes with work, in turn order
        self._deficit: dict[str, int] = {}
        self._rows_by_key: Counter[Hashable] = Counter()  # waiting rows: "ready?" in O(1)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def waiting(self, lane: str) -> int:
        return len(self._lanes.get(lane, ()))

    def lane_full(self, lane: str) -> bool:
        """Does ``lane`` hold its share of the queue: ``max_queue_size`` over the lanes
        waiting plus one (room for a newcomer)? Such a sender is refused before decoding."""
        waiting = self.waiting(lane)
        others = len(self._lanes) - (1 if waiting else 0)
        return waiting >= max(1, self.max_queue_size // (others + 2))

    def submit(self, payload: T, *, rows: int, key: Hashable, lane: str = "") -> Pending[T] | None:
        """Queue one request in ``lane``; returns a request pushed out to make room (the
        caller answers it 429), or raises ``Overloaded`` when this lane holds the most."""
        pushed_out = None
        if self._size >= self.max_queue_size:
            heaviest = max(self._lanes, key=lambda name: len(self._lanes[name]))
            if self.waiting(lane) + 1 >= len(self._lanes[heaviest]):
                raise Overloaded(
                    f"queue full ({self.max_queue_size} requests waiting, the most of them "
                    "yours); retry later"
                )
            pushed_out = self._lanes[heaviest].pop()
            self._forget(pushed_out)
            if not self._lanes[heaviest]:
                del self._lanes[heaviest], self._deficit[heaviest]
        queue = self._lanes.get(lane)
        if queue is None:
            queue = self._lanes[lane] = deque()
            self._deficit[lane] = 0
        queue.append(Pending(payload, rows, key, lane))
        self._rows_by_key[key] += rows
        self._size += 1
        self._arrived.set()
        return pushed_out

    def _oldest(self) -> float:
        return min(queue[0].enqueued for queue in self._lanes.values())

    def _ready(self) -> bool:
        rows = self._rows_by_key[next(iter(self._lanes.values()))[0].key]
        return rows >= self.max_batch_size or rows in self.preferred

    def _forget(self, item: Pending[T]) -> None:
        self._size -= 1
        left = self._rows_by_key[item.key] - item.rows
        if left:
            self._rows_by_key[item.key] = left
        else:
            del self._rows_by_key[item.key]

    def _take(self) -> list[Pending[T]]:
        first = next(iter(self._lanes))
        key = self._lanes[first][0].key
        quantum = max(1, self.max_batch_size // len(self._lanes))
        # The opener's first request always fits: every lane opens batches in turn, so no
        # request waits for ever behind a stream of smaller ones.
        self._deficit[first] = max(self._deficit[first], self._lanes[first][0].rows - quantum)
        batch: list[Pending[T]] = []
        rows = 0
        for _ in range(self.max_batch_size + 1):  # deficits grow each turn: bounded
            eligible = False
            for lane in list(self._lanes):
                queue = self._lanes[lane]
                if queue[0].key != key or rows + queue[0].rows > self.max_batch_size:
                    continue
                eligible = True
                deficit = min(self._deficit[lane] + quantum, self.max_batch_size)
                while queue and queue[0].key == key and queue[0].rows <= deficit:
                    if rows + queue[0].rows > self.max_batch_size:
                        break
                    item = queue.popleft()
                    self._forget(item)
                    batch.append(item)
                    rows += item.rows
                    deficit -= item.rows
                self._deficit[lane] = deficit
                if not queue:
                    del self._lanes[lane], self._deficit[lane]
            if not eligible or rows >= self.max_batch_size:
                break
        if first in self._lanes:  # the opener waits behind the others next time
            self._lanes[first] = self._lanes.pop(first)
        return batch

    def take_all(self) -> list[Pending[T]]:
        taken = [item for queue in self._lanes.values() for item in queue]
        self._empty()
        return taken
