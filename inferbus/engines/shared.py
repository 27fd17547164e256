"""Weights loaded once per process and shared by the instances that serve them.

A model version with ``instances = N`` used to load N copies of its weights (N TensorRT
engines, N torch modules). The instances now lease one copy: the first lease loads it, the last
release drops it. Each lease also gets a slot number, the lowest free one, which a TensorRT
instance uses as its optimization profile (contexts in concurrent use need separate profiles).
When every slot of a copy is leased (a new version of the same file loading while the old one
drains), the next lease loads another copy rather than failing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Copy(Generic[T]):
    value: T
    slots: int | None  # None: any number of leases
    taken: set[int] = field(default_factory=set)

    def free_slot(self) -> int | None:
        slot = next(i for i in range(len(self.taken) + 1) if i not in self.taken)
        return None if self.slots is not None and slot >= self.slots else slot


@dataclass(slots=True, eq=False)
class Lease(Generic[T]):
    """One holder's share of a loaded value; ``release`` exactly once."""

    value: T
    slot: int
    _owner: SharedLoads[T]
    _key: Hashable
    _copy: _Copy[T]

    def release(self) -> bool:
        """Give the lease back; True when it was the copy's last (the value is dropped)."""
        return self._owner._release(self)


class SharedLoads(Generic[T]):
    """Leases on values keyed by what they were loaded from (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: dict[Hashable, list[_Copy[T]]] = {}

    def acquire(self, key: Hashable, load: Callable[[], T], *, slots: int | None = None
                ) -> Lease[T]:  # fmt: skip
        """A lease on a loaded copy for ``key`` with a free slot, loading a copy when none has
        one. ``slots`` caps the leases one copy takes."""
        with self._lock:  # loads are rare and short next to serving; one at a time is fine
            copies = self._copies.setdefault(key, [])
            for copy in copies:
                slot = copy.free_slot()
                if slot is not None:
                    break
            else:
                try:
                    copy = _Copy(load(), slots)
                except BaseException:
                    if not copies:
                        del self._copies[key]
                    raise
                copies.append(copy)
                slot = 0
            copy.taken.add(slot)
            return Lease(copy.value, slot, self, key, copy)

    def _release(self, lease: Lease[T]) -> bool:
        with self._lock:
            copy = lease._copy
            if lease.slot not in copy.taken:
                return False  # released before
            copy.taken.discard(lease.slot)
            if copy.taken:
                return False
            copies = self._copies[lease._key]
            copies.remove(copy)
            if not copies:
                del self._copies[lease._key]
            return True

    def copies(self, key: Hashable) -> list[int]:
        """How many leases each loaded copy for ``key`` holds."""
        with self._lock:
            return [len(copy.taken) for copy in self._copies.get(key, [])]

    def held(self) -> dict[Hashable, list[int]]:
        """``copies`` for every key that has a loaded copy."""
        with self._lock:
            return {key: [len(c.taken) for c in copies] for key, copies in self._copies.items()}
