"""``Client.map``: packing several samples in one request and splitting them back after, and
the window of requests in flight.

Packing is the big lever for small models: one request carries ``pack`` samples, so the
per-message cost (encode, NATS hop, decode) is paid once for all of them.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections import deque
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferbus.contract import Tensors
from inferbus.errors import BadInput, EngineFailure, RequestError
from inferbus.pipeline.discovery import Directory
from inferbus.pipeline.result import InferResult


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive items packed into one request: where they start and how many rows each."""

    first: int
    inputs: Tensors
    rows: tuple[int, ...]


def _key(item: Tensors) -> Hashable:
    return tuple((name, array.shape[1:], array.dtype.str) for name, array in item.items())


def _rows(item: Tensors) -> int:
    sizes = {np.shape(array)[0] if np.ndim(array) else -1 for array in item.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise BadInput("packed items need the same leading (batch) dimension on every input")
    return sizes.pop()


def pack_items(items: Iterable[Tensors], samples: int, max_rows: int) -> Iterator[Chunk]:
    """Group consecutive compatible items, at most ``samples`` items and ``max_rows`` rows each."""
    group: list[Tensors] = []
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


def slices(inputs: Tensors, rows: int) -> Iterator[Chunk]:
    """Cut arrays whose first axis enumerates items into chunks of ``rows`` items (views)."""
    total = _rows(inputs)
    for start in range(0, total, rows):
        stop = min(start + rows, total)
        part = {name: array[start:stop] for name, array in inputs.items()}
        yield Chunk(start, part, (1,) * (stop - start))


def _chunk(first: int, group: list[Tensors], rows: list[int]) -> Chunk:
    if len(group) == 1:
        return Chunk(first, group[0], tuple(rows))
    inputs = {name: np.concatenate([item[name] for item in group]) for name in group[0]}
    return Chunk(first, inputs, tuple(rows))


def unpack(outputs: Tensors, rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
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


Infer = Callable[[Tensors], Coroutine[Any, Any, InferResult]]


async def run_window(
    chunks: Iterable[Chunk],
    infer: Infer,
    *,
    concurrency: int,
    errors: str,
    progress: Any,
) -> AsyncIterator[InferResult | RequestError]:
    """Results of ``infer`` on every chunk, one per packed item, in order, with
    ``concurrency`` chunks in flight.

    With ``errors="raise"`` the first failed item raises; otherwise it is yielded in place.
    Leaving early (a raise, or the caller breaking off) cancels what is still in flight."""
    window: deque[asyncio.Task[list[InferResult | RequestError]]] = deque()
    pending = iter(chunks)
    try:
        while True:
            for chunk in itertools.islice(pending, concurrency - len(window)):
                window.append(asyncio.create_task(_infer_chunk(infer, chunk)))
            if not window:
                return
            results = await window.popleft()
            progress.update(len(results))
            for result in results:
                if errors == "raise" and isinstance(result, RequestError):
                    raise result
                yield result
    finally:
        for task in window:
            task.cancel()
        await asyncio.gather(*window, return_exceptions=True)
        progress.close()


async def _infer_chunk(infer: Infer, chunk: Chunk) -> list[InferResult | RequestError]:
    try:
        result = await infer(chunk.inputs)
    except RequestError as exc:
        return [exc] * len(chunk.rows)
    return list(split_result(result, chunk.rows))


def split_result(result: InferResult, rows: Sequence[int]) -> list[InferResult]:
    """One result per packed item."""
    parts = unpack(result, rows)
    return [InferResult(part, result.model_name, result.model_version, result.id) for part in parts]


def progress_bar(progress: bool | None, total: int | None, model: str) -> Any:
    """A tqdm bar (shown by default only on a terminal)."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, disable=not show, desc=model, unit="item", dynamic_ncols=True)


def length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


async def chunks(
    directory: Directory,
    model: str,
    version: int | None,
    items: Iterable[Any] | Tensors,
    pack: int,
    total: int | None,
) -> tuple[Iterator[Chunk], int | None]:
    """What ``map`` sends, and how many items that is when it can tell."""
    info = await directory.describe(model, version) if pack > 1 else None
    max_rows = info.max_batch_size if info else 1
    if isinstance(items, np.ndarray | Mapping):
        # One array (or named arrays) holding all items along the first axis: sliced.
        named = await directory.named(model, version, items)
        rows = len(next(iter(named.values())))
        return slices(named, min(pack, max_rows)), rows if total is None else total
    named_items = await directory.named_items(model, version, items)
    return pack_items(named_items, pack, max_rows), length(items) if total is None else total
