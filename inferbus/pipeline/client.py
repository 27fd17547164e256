"""The application end: ``async with inferbus.connect(...) as client: await client.infer(...)``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from inferbus.codecs import InferRequest, decode_error, decode_response, encode_request
from inferbus.codecs.base import Choices
from inferbus.codecs.wire import DEFAULT_DECODE_LIMIT
from inferbus.errors import (
    BadInput,
    DeadlineExceeded,
    EngineFailure,
    ModelNotFound,
    RequestError,
    Unavailable,
    error_for_code,
)
from inferbus.pipeline import _transfer as transfer
from inferbus.pipeline._connection import ConnectOptions, connect_nats, split_servers
from inferbus.pipeline._lifecycle import AsyncResource
from inferbus.pipeline._mapping import Chunk, pack_items, slices, unpack
from inferbus.pipeline._retry import RetryPolicy
from inferbus.pipeline._transfer import is_offer
from inferbus.pipeline.discovery import ModelInfo, models_from_infos, serves, service_infos
from inferbus.pipeline.subjects import ERROR_CODE_HEADER, infer_subject

DEFAULT_TIMEOUT = 10.0
STOP_WAIT_S = 10.0
DESCRIBE_TTL_S = 60.0
log = logging.getLogger("inferbus.client")
Inputs = np.ndarray | Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True, eq=False)  # arrays have no single truth value to compare
class InferResult(Mapping[str, np.ndarray]):
    """A model's named outputs (a read-only mapping) and where they came from."""

    outputs: Mapping[str, np.ndarray]
    model_name: str
    model_version: str
    id: str = ""
    attempts: int = 1  # how many times the client sent it (retries are within the budget)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    @property
    def output(self) -> np.ndarray:
        """The only output, for single-output models."""
        if len(self.outputs) != 1:
            raise KeyError(f"model has outputs {list(self.outputs)}; pick one by name")
        return next(iter(self.outputs.values()))


class Client(AsyncResource):
    """A connection to an inferbus cluster. Create it with ``inferbus.connect``."""

    def __init__(
        self,
        options: ConnectOptions,
        *,
        max_in_flight: int = 256,
        retry: RetryPolicy | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise BadInput("max_in_flight must be >= 1")
        self.options = options
        self.retry = retry or RetryPolicy()
        self._nats: NatsClient | None = None
        self._described: dict[tuple[str, int | None], tuple[ModelInfo, float]] = {}
        self._subjects: dict[tuple[str, int | None], str] = {}
        self._typical: dict[str, float] = {}
        self._busy = 0  # calls in flight, so that stop() can let them finish
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid()}-{id(self):x}-"

    @property
    def nats(self) -> NatsClient:
        """The underlying nats-py connection."""
        if self._nats is None:
            raise Unavailable("client is not connected; use `async with inferbus.connect()`")
        return self._nats

    async def start(self) -> None:
        """Connect to NATS (``async with`` does this)."""
        if self._nats is None:
            self._nats = await connect_nats(self.options)

    async def stop(self) -> None:
        """Let calls in flight finish (up to ``STOP_WAIT_S``), then disconnect."""
        if self._nats is not None and self._busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), STOP_WAIT_S)
        client, self._nats = self._nats, None
        if client is not None and not client.is_closed:
            await client.drain()

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
        deadline = started + timeout
        subject = self._subjects.get((model, version)) or self._subject(model, version)
        named = inputs if type(inputs) is dict else await self._named(model, version, inputs)
        request_id = f"{self._id_prefix}{next(self._ids)}"
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._attempt(
                    subject, model, named, request_id, deadline, attempt,
                    (tuple(outputs), codec, reply_codec),
                )  # fmt: skip
            except RequestError as exc:
                now = time.monotonic()
                wait = self.retry.delay(attempt)
                if now + wait >= deadline or not self.retry.should_retry(
                    exc, attempt, now - started
                ):
                    raise
                log.info("%s: attempt %d failed (%s); retrying in %.0f ms", model, attempt, exc,
                         wait * 1e3)  # fmt: skip
                await asyncio.sleep(wait)
                continue
            took = time.monotonic() - started
            typical = self._typical.get(model)
            # Slow-moving average of how long this model's calls take, for attempt timeouts.
            self._typical[model] = took if typical is None else 0.9 * typical + 0.1 * took
            return result

    async def _attempt(
        self,
        subject: str,
        model: str,
        named: Mapping[str, np.ndarray],
        request_id: str,
        deadline: float,
        attempt: int,
        options: tuple[tuple[str, ...], Choices, str | None],
    ) -> InferResult:
        outputs, codec, reply_codec = options
        self._busy += 1  # stop() lets calls in flight finish
        self._idle.clear()
        try:
            async with self._slots:
                # The budget is the caller's: time spent waiting for a slot comes out of it.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded("the time budget ran out waiting for a request slot")
                budget = self.retry.attempt_timeout(remaining, attempt, self._typical.get(model))
                request = InferRequest(request_id, named, outputs, int(budget * 1e6), reply_codec)
                body = encode_request(request, codec)
                if len(body) > self.nats.max_payload:
                    reply = await self._request_large(subject, body, budget, model)
                else:
                    reply = await self._request(subject, body, budget, model)
                data: bytes | bytearray = reply.data
                if is_offer(reply):  # the reply itself is too large for one message
                    data = await self._receive(reply, deadline - time.monotonic(), model)
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()
        return _result(reply, data, model, attempt)

    async def _request_large(self, subject: str, body: bytes, timeout: float, model: str) -> Msg:
        """Send a body above max_payload in chunks; the reply comes to a private inbox."""
        inbox = self.nats.new_inbox()
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        subscription = await self.nats.subscribe(inbox, cb=replies.put, max_msgs=1)
        try:
            started = time.monotonic()
            await transfer.send(self.nats, subject, body, timeout=timeout, reply=inbox)
            left = timeout - (time.monotonic() - started)
            return await asyncio.wait_for(replies.get(), max(left, 0.001))
        except transfer.NobodyTook:
            raise ModelNotFound(f"no worker serves {subject}", model=model) from None
        except RequestError as exc:
            exc.model = model
            raise
        except TimeoutError:
            raise DeadlineExceeded(f"no reply within {timeout:g}s", model=model) from None
        finally:
            if not self.nats.is_closed:
                await subscription.unsubscribe()

    async def _receive(self, offer: Msg, timeout: float, model: str) -> bytearray:
        try:
            receiver = await transfer.Receiver.accept(self.nats, offer, DEFAULT_DECODE_LIMIT)
        except RequestError as exc:
            exc.model = model
            raise
        try:
            return await asyncio.wait_for(receiver.wait(), max(timeout, 0.001))
        except TimeoutError:
            raise DeadlineExceeded(f"the reply did not arrive within {timeout:g}s") from None

    async def _request(self, subject: str, body: bytes, timeout: float, model: str) -> Msg:
        try:
            return await self.nats.request(subject, body, timeout=timeout)
        except NoRespondersError:
            raise ModelNotFound(f"no worker serves {subject}", model=model) from None
        except NatsTimeoutError:
            raise DeadlineExceeded(
                f"no reply within {timeout:g}s", model=model, silent=True
            ) from None
        except ConnectionClosedError as exc:
            raise Unavailable(f"NATS connection closed: {exc}", model=model) from exc

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
        info = await self.describe(model, version) if pack > 1 else None
        max_rows = info.max_batch_size if info else 1
        chunks: Iterator[Chunk]
        if isinstance(items, np.ndarray | Mapping):
            # One array (or named arrays) holding all items along the first axis: sliced.
            named = await self._named(model, version, items)
            chunks = slices(named, min(pack, max_rows))
            total = len(next(iter(named.values()))) if total is None else total
        else:
            chunks = pack_items(await self._named_items(model, version, items), pack, max_rows)
        bar = _progress_bar(progress, total if total is not None else _length(items), model)
        window: deque[asyncio.Task[list[InferResult | RequestError]]] = deque()
        try:
            for chunk in chunks:
                call = self._infer_chunk(model, chunk, version, timeout, (codec, reply_codec))
                window.append(asyncio.create_task(call))
                if len(window) >= concurrency:
                    for result in await _next_results(window, errors, bar):
                        yield result
            while window:
                for result in await _next_results(window, errors, bar):
                    yield result
        finally:
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)
            bar.close()

    async def _infer_chunk(
        self,
        model: str,
        chunk: Chunk,
        version: int | None,
        timeout: float,
        codecs: tuple[Choices, str | None],
    ) -> list[InferResult | RequestError]:
        try:
            result = await self.infer(
                model,
                chunk.inputs,
                version=version,
                timeout=timeout,
                codec=codecs[0],
                reply_codec=codecs[1],
            )
        except RequestError as exc:
            return [exc] * len(chunk.rows)
        parts = unpack(result, chunk.rows)
        return [
            InferResult(part, result.model_name, result.model_version, result.id) for part in parts
        ]

    def _subject(self, model: str, version: int | None) -> str:
        subject = self._subjects[(model, version)] = infer_subject(model, version)
        return subject

    async def describe(self, model: str, version: int | None = None) -> ModelInfo:
        """The signature and limits of a served model (asked again after ``DESCRIBE_TTL_S``,
        so a redeployed model is seen)."""
        key = (model, version)
        cached = self._described.get(key)
        if cached is not None and time.monotonic() - cached[1] < DESCRIBE_TTL_S:
            return cached[0]
        found = [
            m
            for m in await self.models(until=serves(model, version))
            if m.name == model and version in (None, m.version)
        ]
        if not found:
            subject = infer_subject(model, version)
            raise ModelNotFound(f"no worker serves {subject}", model=model)
        self._described[key] = (found[-1], time.monotonic())
        return found[-1]

    async def _named_items(
        self, model: str, version: int | None, items: Iterable[Inputs]
    ) -> Iterator[Mapping[str, np.ndarray]]:
        """Items as named arrays, lazily; the input name is looked up once if needed."""
        iterator = iter(items)
        first = next(iterator, None)
        if first is None:
            return iter(())
        if isinstance(first, Mapping):
            return itertools.chain([first], iterator)  # type: ignore[arg-type]
        (name,) = (await self._named(model, version, first)).keys()
        return ({name: np.asarray(item)} for item in itertools.chain([first], iterator))

    async def _named(
        self, model: str, version: int | None, inputs: Inputs
    ) -> Mapping[str, np.ndarray]:
        """A bare array goes to the model's only input."""
        if isinstance(inputs, Mapping):
            return inputs
        names = [spec.name for spec in (await self.describe(model, version)).signature.inputs]
        if len(names) != 1:
            raise BadInput(f"model has inputs {names}: pass a dict of named arrays", model=model)
        return {names[0]: np.asarray(inputs)}

    async def models(
        self, *, timeout: float = 0.5, until: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[ModelInfo]:
        """Every model version served in the cluster, gathered from the workers' $SRV.INFO
        for ``timeout`` seconds (or until a reply satisfies ``until``)."""
        infos = await service_infos(self.nats, timeout=timeout, until=until)
        return models_from_infos(infos)


def _result(reply: Msg, data: bytes | bytearray, model: str, attempts: int) -> InferResult:
    code = (reply.headers or {}).get(ERROR_CODE_HEADER)
    if code is not None:
        number = int(code) if code.isascii() and code.isdigit() else 500
        raise error_for_code(number, decode_error(reply.data), model=model)
    try:
        response = decode_response(data)
    except BadInput as exc:  # the worker broke the protocol; the caller's input was fine
        raise EngineFailure(f"malformed reply: {exc.message}", model=model) from exc
    return InferResult(
        response.outputs, response.model_name, response.model_version, response.id, attempts
    )


def connect(
    servers: str | Sequence[str] | None = None,
    *,
    name: str = "inferbus-client",
    max_in_flight: int = 256,
    retry: RetryPolicy | None = None,
    creds: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Client:
    """A client for ``servers`` (default ``$INFERBUS_SERVERS`` or nats://127.0.0.1:4222).

    Use it as ``async with inferbus.connect(...) as client``. ``creds`` is a NATS credentials
    file (default ``$INFERBUS_CREDS``); ``tls_*`` are PEM paths for TLS. At most
    ``max_in_flight`` requests wait for replies at once; more wait their turn in the client.
    ``retry`` says how requests are tried again after no responders (briefly), a full queue,
    an unavailable or silent worker — always within each call's ``timeout``.
    """
    settings: dict[str, Any] = {"name": name, "tls_ca": tls_ca, "tls_cert": tls_cert}
    settings["tls_key"] = tls_key
    if servers is not None:
        settings["servers"] = split_servers(servers if isinstance(servers, str) else list(servers))
    if creds is not None:
        settings["creds"] = creds
    return Client(ConnectOptions(**settings), max_in_flight=max_in_flight, retry=retry)


async def _next_results(
    window: deque[asyncio.Task[list[InferResult | RequestError]]],
    errors: str,
    bar: Any,
) -> list[InferResult | RequestError]:
    results = await window.popleft()
    bar.update(len(results))
    if errors == "raise":
        for result in results:
            if isinstance(result, RequestError):
                raise result
    return results


def _length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _progress_bar(progress: bool | None, total: int | None, model: str) -> Any:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, disable=not show, desc=model, unit="item", dynamic_ncols=True)
