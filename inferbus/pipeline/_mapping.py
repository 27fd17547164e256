"""Client-side packing for ``Client.map``: several samples in one request, split back after.

Packing is the big lever for small models: one request carries ``pack`` samples, so the
per-message cost (encode, NATS hop, decode) is paid once for all of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inferbus.errors import BadInput, EngineFailure

Named = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive items packed into one request: where they start and how many rows each."""

    first: int
    inputs: Named
    rows: tuple[int, ...]


def _key(item: Named) -> Hashable:
    return tuple((name, array.shape[1:], array.dtype.str) for name, array in item.items())


def _rows(item: Named) -> int:
    sizes = {np.shape(array)[0] if np.ndim(array) else -1 for array in item.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise BadInput("packed items need the same leading (batch) dimension on every input")
    return sizes.pop()


def pack_items(items: Iterable[Named], samples: int, max_rows: int) -> Iterator[Chunk]:
    """Group consecutive compatible items, at most ``samples`` items and ``max_rows`` rows each."""
    group: list[Named] = []
    rows: list[int] = []
    first = 0
    for index, item in enumerate(items):
        count = _rows(item) if samples > 1 else 1
        fits = len(group) < samples and sum(rows) + count <= max_rows
        if group and not (fits and _key(item) == _key(group[0])):
            yield _chunk(first, group, rows)
            group, rows, first = [], [], index
        group.append(item)
        rows.append(count)
    if group:
        yield _chunk(first, group, rows)


def slices(inputs: Named, rows: int) -> Iterator[Chunk]:
    """Cut arrays whose first axis enumerates items into chunks of ``rows`` items (views)."""
    total = _rows(inputs)
    for start in range(0, total, rows):
        stop = min(start + rows, total)
        part = {name: array[start:stop] for name, array in inputs.items()}
        yield Chunk(start, part, (1,) * (stop - start))


def _chunk(first: int, group: list[Named], rows: list[int]) -> Chunk:
    if len(group) == 1:
        return Chunk(first, group[0], tuple(rows))
    inputs = {name: np.concatenate([item[name] for item in group]) for name in group[0]}
    return Chunk(first, inputs, tuple(rows))


def unpack(outputs: Named, rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Split batched outputs back into one mapping per request (worker) or item (client)."""
    if len(rows) == 1:
        return [dict(outputs)]
    bounds = np.cumsum([0, *rows])
    for name, array in outputs.items():
        if np.ndim(array) == 0 or array.shape[0] != bounds[-1]:
            shape = list(np.shape(array))
            raise EngineFailure(f"output {name!r} has shape {shape}, not {bounds[-1]} rows")
    return [
        {name: array[start:stop] for name, array in outputs.items()}
        for start, stop in itertools.pairwise(bounds)
    ]
