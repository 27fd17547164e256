"""The one way blocking work leaves the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Final, ParamSpec, TypeVar

# Decoding a body larger than this (or one whose tensors use a codec) leaves the event loop.
DECODE_OFF_LOOP_BYTES: Final = 1 << 20

P = ParamSpec("P")
T = TypeVar("T")


async def run_in_thread(
    executor: Executor | None, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``func`` on ``executor`` (the loop's default when None) and await its result."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    call = functools.partial(context.run, func, *args, **kwargs)
    return await loop.run_in_executor(executor, call)
