"""A synchronous door to the client, for plain scripts: the same calls, blocking.

    from inferbus import sync

    with sync.connect("nats://127.0.0.1:4222") as client:
        result = client.infer("digits", {"pixels": pixels})
        for answer in client.model(DigitsClassifier).map(images, pack=64):
            ...

It is not a second client: ``SyncClient`` runs the async ``Client`` (and ``Model``) on one event
loop in a background thread and waits for each call, so errors, retries, transfers and the
progress bar are the async client's own. Calls may come from any thread; Ctrl-C cancels the
call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from inferbus.errors import Unavailable
from inferbus.pipeline.client import Client, InferResult, Inputs
from inferbus.pipeline.client import connect as async_connect
from inferbus.pipeline.discovery import ModelInfo
from inferbus.pipeline.model import In, Model, Out

__all__ = ["BackgroundLoop", "SyncClient", "SyncModel", "connect"]

T = TypeVar("T")
P = ParamSpec("P")


class BackgroundLoop:
    """An event loop on a daemon thread of its own (uvloop where installed: measured faster
    for NATS I/O); ``run`` blocks the caller until a coroutine is done there."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="inferbus-sync-loop", daemon=True
        )
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            work.close()
            raise RuntimeError("a blocking inferbus call from inside its own event loop")
        if self.loop.is_closed():
            work.close()
            raise Unavailable("client is closed; use `with inferbus.sync.connect()`")
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result()
        except (KeyboardInterrupt, SystemExit):
            future.cancel()  # the call in flight stops; its request is abandoned
            with contextlib.suppress(Exception):  # what a cancelled call ends with
                future.result(timeout=5)
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncClient:
    """``inferbus.Client`` with every call blocking; ``sync.connect`` makes one. Use it as a
    context manager (or call ``close``): it connects on entry and lets calls in flight finish
    on exit."""

    def __init__(self, client: Client) -> None:
        self.client = client  # the async client it drives, for what has no blocking form
        self._loop = BackgroundLoop()

    def __enter__(self) -> SyncClient:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Connect to NATS (``with`` does this)."""
        self._run(self.client.start())

    def close(self) -> None:
        """Let calls in flight finish, disconnect, and stop the background loop."""
        if not self._loop.loop.is_closed():
            try:
                self._run(self.client.stop())
            finally:
                self._loop.close()

    def infer(self, model: str, inputs: Inputs, **options: Any) -> InferResult:
        """``Client.infer``, blocking; the same keywords (``version``, ``timeout``, ``codec`` …)."""
        return self._run(self.client.infer(model, inputs, **options))

    def map(self, model: str, items: Iterable[Any], **options: Any) -> Iterator[Any]:
        """``Client.map``, as a plain iterator; the same keywords (``pack``, ``concurrency``,
        ``errors``, ``progress`` …). Results come in input order as they arrive."""
        return self._iterate(self.client.map(model, items, **options))

    def describe(self, model: str, version: int | None = None) -> ModelInfo:
        return self._run(self.client.describe(model, version))

    def models(self, **options: Any) -> list[ModelInfo]:
        return self._run(self.client.models(**options))

    def model(self, kind: Callable[..., Model[In, Out]], **options: Any) -> SyncModel[In, Out]:
        """A ``Model`` subclass bound to this client, called without ``await``:
        ``client.model(DigitsClassifier)(images)``; ``options`` go to its constructor."""
        return SyncModel(kind(self.client, **options), self)

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(work)

    def _iterate(self, results: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_next(results))
                except StopAsyncIteration:
                    return
        finally:  # stopped early (break, error): the async generator closes its requests
            if not self._loop.loop.is_closed():
                self._run(_aclose(results))


class SyncModel(Generic[In, Out]):
    """A ``Model`` called without ``await``: ``model(item)`` and ``model.map(items)``."""

    def __init__(self, model: Model[In, Out], client: SyncClient) -> None:
        self.model = model
        self._client = client

    def __call__(self, item: In) -> Out:
        return self._client._run(self.model(item))

    def map(
        self, items: Iterable[In], *, concurrency: int = 16, pack: int = 1,
        progress: bool | None = None,
    ) -> Iterator[Out]:  # fmt: skip
        """``Model.map``, as a plain iterator."""
        answers = self.model.map(items, concurrency=concurrency, pack=pack, progress=progress)
        return self._client._iterate(answers)


def _blocking(make: Callable[P, Client]) -> Callable[P, SyncClient]:
    @functools.wraps(make)
    def connect(*args: P.args, **kwargs: P.kwargs) -> SyncClient:
        return SyncClient(make(*args, **kwargs))

    return connect


#: ``inferbus.connect`` with the same arguments, returning a ``SyncClient``
connect = _blocking(async_connect)


async def _next(results: AsyncIterator[T]) -> T:
    return await anext(results)


async def _aclose(results: AsyncIterator[Any]) -> None:
    close = getattr(results, "aclose", None)
    if close is not None:
        await close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
