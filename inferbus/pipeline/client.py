"""The application end: ``async with inferbus.connect(...) as client: await client.infer(...)``.
Retries, the discovery cache and ``map`` live here; moving bytes is the ``Transport``'s job."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
from nats.aio.client import Client as NatsClient

from inferbus.codecs import Choices, InferRequest, encode_request
from inferbus.contract import infer_subject
from inferbus.errors import BadInput, DeadlineExceeded, ModelNotFound, RequestError, Unavailable
from inferbus.pipeline import mapping
from inferbus.pipeline._threads import run_in_thread
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.discovery import Directory, ModelInfo
from inferbus.pipeline.lifecycle import AsyncResource
from inferbus.pipeline.result import InferResult, needs_thread, read_result
from inferbus.pipeline.retry import RetryPolicy
from inferbus.pipeline.transport import MAX_REPLY_BYTES as REPLY_BYTES
from inferbus.pipeline.transport import MAX_REPLY_BYTES_IN_FLIGHT as IN_FLIGHT
from inferbus.pipeline.transport import ReplyLimits, Transport

DEFAULT_TIMEOUT = 10.0
STOP_WAIT_S = 10.0
log = logging.getLogger("inferbus.client")
Inputs = np.ndarray | Mapping[str, np.ndarray]

__all__ = ["DEFAULT_TIMEOUT", "Client", "InferResult", "Inputs", "connect"]


@dataclass(frozen=True, slots=True)
class _Call:
    """One ``infer`` call's choices, fixed for all its attempts."""

    model: str
    version: int | None
    subject: str
    outputs: tuple[str, ...] = ()
    codec: Choices = None
    reply_codec: str | None = None
    large: bool = False  # sent in chunks: not cut short by a latency-based attempt timeout


class Client(AsyncResource):
    """A connection to an inferbus cluster. Create it with ``inferbus.connect``."""

    def __init__(
        self,
        options: ConnectOptions,
        *,
        max_in_flight: int = 256,
        retry: RetryPolicy | None = None,
        reply_limits: ReplyLimits | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise BadInput("max_in_flight must be >= 1")
        self.options = options
        self.retry = retry or RetryPolicy()
        self.reply_limits = reply_limits or ReplyLimits()
        self._transport: Transport | None = None
        self._models: Directory | None = None
        self._max_payload = 0  # the server's, once connected
        self._subjects: dict[tuple[str, int | None], str] = {}
        self._typical: dict[str, float] = {}
        self._busy = 0  # calls in flight, backoffs included, so that stop() can let them finish
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid()}-{id(self):x}-"

    @property
    def nats(self) -> NatsClient:  # the underlying nats-py connection
        return self._connected().nats

    def _connected(self) -> Transport:
        if self._transport is None:
            raise Unavailable("client is not connected; use `async with inferbus.connect()`")
        return self._transport

    def _directory(self) -> Directory:
        if self._models is None:
            raise Unavailable("client is not connected; use `async with inferbus.connect()`")
        return self._models

    async def start(self) -> None:
        """Connect to NATS (``async with`` does this)."""
        if self._transport is None:
            self._transport = await Transport.open(self.options, self.reply_limits)
            self._models = Directory(self._transport.nats)
            self._max_payload = self._transport.nats.max_payload

    async def stop(self) -> None:
        """Let calls in flight finish (up to ``STOP_WAIT_S``), then disconnect."""
        if self._transport is not None and self._busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), STOP_WAIT_S)
        transport, self._transport, self._models = self._transport, None, None
        if transport is not None:
            await transport.close()

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        outputs: Sequence[str] = (),
        codec: Choices = None,
        reply_codec: str | None = None,
    ) -> InferResult:
        """Run ``model`` on ``inputs`` (one array, or named arrays) on some worker.

        ``codec`` picks how inputs travel ("raw", "zstd", "lz4", "fp16", "jpeg" or a codec
        object such as ``Jpeg(quality=80)``; one for all inputs, or a dict by input name);
        ``reply_codec`` asks the worker to send the outputs that way. Raises
        ``ModelNotFound`` at once when no worker serves the model, ``DeadlineExceeded`` after
        ``timeout`` seconds, and the matching ``RequestError`` for an error reply.
        """
        if timeout <= 0:
            raise BadInput("timeout must be positive")
        started = time.monotonic()
        subject = self._subjects.get((model, version))
        if subject is None:  # checked and cached: the name rule is run once per model
            subject = self._subjects[(model, version)] = infer_subject(model, version)
        directory = self._directory()
        named = inputs if type(inputs) is dict else await directory.named(model, version, inputs)
        large = sum([getattr(a, "nbytes", 0) for a in named.values()]) > self._max_payload
        call = _Call(model, version, subject, tuple(outputs), codec, reply_codec, large)
        request_id = f"{self._id_prefix}{next(self._ids)}"
        self._busy += 1  # stop() lets calls in flight finish, backoffs included
        self._idle.clear()
        try:
            result = await self.retry.run(
                lambda attempt: self._attempt(call, named, request_id, started + timeout, attempt),
                started=started,
                deadline=started + timeout,
                label=model,
            )
        except RequestError as exc:
            exc.model = exc.model or model
            raise
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()
        took = time.monotonic() - started
        typical = self._typical.get(model)
        # Slow-moving average of how long this model's calls take, for attempt timeouts.
        self._typical[model] = took if typical is None else 0.9 * typical + 0.1 * took
        return result

    async def _attempt(
        self,
        call: _Call,
        named: Mapping[str, np.ndarray],
        request_id: str,
        deadline: float,
        attempt: int,
    ) -> InferResult:
        async with self._slots:
            # The budget is the caller's: time spent waiting for a slot comes out of it.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the time budget ran out waiting for a request slot")
            typical = None if call.large else self._typical.get(call.model)
            budget = self.retry.attempt_timeout(remaining, typical)
            request = InferRequest(
                request_id, named, call.outputs, int(budget * 1e6), call.reply_codec
            )
            body = encode_request(request, call.codec)
            try:
                data = await self._connected().exchange(call.subject, body, budget, remaining)
            except ModelNotFound:  # deployed in a store, perhaps: a worker may load it now
                if await self._directory().demand(call.model, call.version, remaining):
                    raise Unavailable("loaded on demand by the model store; sent again") from None
                raise
        limit = self.reply_limits.max_bytes
        if needs_thread(data):
            return await run_in_thread(None, read_result, data, request_id, limit, attempt)
        return read_result(data, request_id, limit, attempt)

    @overload
    def map(
        self,
        model: str,
        items: Iterable[Inputs] | Mapping[str, np.ndarray],
        *,
        version: int | None = ...,
        timeout: float = ...,
        concurrency: int = ...,
        pack: int = ...,
        errors: Literal["raise"] = ...,
        codec: Choices = ...,
        reply_codec: str | None = ...,
        progress: bool | None = ...,
        total: int | None = ...,
    ) -> AsyncIterator[InferResult]: ...

    @overload
    def map(
        self,
        model: str,
        items: Iterable[Inputs] | Mapping[str, np.ndarray],
        *,
        version: int | None = ...,
        timeout: float = ...,
        concurrency: int = ...,
        pack: int = ...,
        errors: Literal["return"],
        codec: Choices = ...,
        reply_codec: str | None = ...,
        progress: bool | None = ...,
        total: int | None = ...,
    ) -> AsyncIterator[InferResult | RequestError]: ...

    async def map(
        self,
        model: str,
        items: Iterable[Inputs] | Mapping[str, np.ndarray],
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        concurrency: int = 16,
        pack: int = 1,
        errors: Literal["raise", "return"] = "raise",
        codec: Choices = None,
        reply_codec: str | None = None,
        progress: bool | None = None,
        total: int | None = None,
    ) -> AsyncIterator[InferResult | RequestError]:
        """Run ``model`` on every item, yielding results in input order.

        Each item is what ``infer`` takes. ``concurrency`` requests are in flight at once;
        ``pack`` > 1 concatenates up to that many consecutive items (up to the model's
        max batch size in rows) into one request and splits the outputs back. With
        ``errors="return"`` a failed item yields its ``RequestError`` in place; with "raise"
        the first failure stops the run. ``progress`` shows a bar (default: on a terminal).
        """
        if concurrency < 1 or pack < 1:
            raise BadInput("concurrency and pack must be >= 1")
        chunks, total = await mapping.chunks(self._directory(), model, version, items, pack, total)
        infer = functools.partial(self.infer, model, version=version, timeout=timeout,
                                  codec=codec, reply_codec=reply_codec)  # fmt: skip
        bar = mapping.progress_bar(progress, total, model)
        async for result in mapping.run_window(
            chunks, infer, concurrency=concurrency, errors=errors, progress=bar
        ):
            yield result

    async def describe(self, model: str, version: int | None = None) -> ModelInfo:
        """The signature and limits of a served model (asked again after a minute, so a
        redeployed model is seen)."""
        return await self._directory().describe(model, version)

    async def models(
        self, *, timeout: float = 0.5, until: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[ModelInfo]:
        """Every model version served in the cluster, gathered from the workers' $SRV.INFO
        for ``timeout`` seconds (or until a reply satisfies ``until``)."""
        return await self._directory().models(timeout=timeout, until=until)


def connect(
    servers: str | Sequence[str] | None = None,
    *,
    name: str = "inferbus-client",
    max_in_flight: int = 256,
    retry: RetryPolicy | None = None,
    connection: str | None = None,
    creds: str | None = None,
    nkey: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    max_reply_bytes: int = REPLY_BYTES,
    max_reply_bytes_in_flight: int = IN_FLIGHT,
) -> Client:
    """A client for ``servers`` (default ``$INFERBUS_SERVERS`` or nats://127.0.0.1:4222).
    ``connection``: a file from ``inferbus roster apply`` (default ``$INFERBUS_CONNECTION``);
    ``creds``, ``nkey``, ``tls_*``: files; what is given overrides the environment and the
    file. ``max_in_flight`` requests wait for replies at once; ``retry``: how requests are
    tried again in each call's ``timeout``; replies take at most ``max_reply_bytes``."""
    identity = {"connection": connection, "creds": creds, "nkey": nkey}
    tls = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
    options = ConnectOptions.given(servers, name=name, **identity, **tls)
    limits = ReplyLimits(max_reply_bytes, max_reply_bytes_in_flight)
    return Client(options, max_in_flight=max_in_flight, retry=retry, reply_limits=limits)
