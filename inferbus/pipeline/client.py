"""The application end: ``async with inferbus.connect(...) as client: await client.infer(...)``."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from inferbus.codecs import InferRequest, decode_error, decode_response, encode_request
from inferbus.errors import (
    BadInput,
    DeadlineExceeded,
    EngineFailure,
    ModelNotFound,
    PayloadTooLarge,
    Unavailable,
    error_for_code,
)
from inferbus.pipeline._connection import ConnectOptions, connect_nats, split_servers
from inferbus.pipeline._lifecycle import AsyncResource
from inferbus.pipeline.discovery import ModelInfo, models_from_infos, serves, service_infos
from inferbus.pipeline.subjects import ERROR_CODE_HEADER, infer_subject

DEFAULT_TIMEOUT = 10.0
Inputs = np.ndarray | Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class InferResult(Mapping[str, np.ndarray]):
    """A model's named outputs (a read-only mapping) and where they came from."""

    outputs: Mapping[str, np.ndarray]
    model_name: str
    model_version: str
    id: str = ""

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

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self._nats: NatsClient | None = None
        self._input_names: dict[tuple[str, int | None], str] = {}
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
        """Finish what is in flight and disconnect (``async with`` does this)."""
        client, self._nats = self._nats, None
        if client is not None:
            await client.drain()

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        outputs: Sequence[str] = (),
    ) -> InferResult:
        """Run ``model`` on ``inputs`` (one array, or named arrays) on some worker.

        Raises ``ModelNotFound`` at once when no worker serves it, ``DeadlineExceeded`` after
        ``timeout`` seconds, and the matching ``RequestError`` for an error reply.
        """
        if timeout <= 0:
            raise BadInput("timeout must be positive")
        subject = infer_subject(model, version)
        named = (
            inputs
            if isinstance(inputs, Mapping)
            else await self._name_single(model, version, inputs)
        )
        request = InferRequest(
            id=f"{self._id_prefix}{next(self._ids)}",
            inputs=named,
            outputs=tuple(outputs),
            timeout_us=int(timeout * 1e6),
        )
        body = encode_request(request)
        if len(body) > self.nats.max_payload:
            raise PayloadTooLarge(
                f"request of {len(body)} bytes exceeds the NATS server's max_payload "
                f"{self.nats.max_payload}",
                model=model,
            )
        reply = await self._request(subject, body, timeout, model)
        return _result(reply, model)

    async def _request(self, subject: str, body: bytes, timeout: float, model: str) -> Msg:
        try:
            return await self.nats.request(subject, body, timeout=timeout)
        except NoRespondersError:
            raise ModelNotFound(f"no worker serves {subject}", model=model) from None
        except NatsTimeoutError:
            raise DeadlineExceeded(f"no reply within {timeout:g}s", model=model) from None
        except ConnectionClosedError as exc:
            raise Unavailable(f"NATS connection closed: {exc}", model=model) from exc

    async def _name_single(
        self, model: str, version: int | None, array: np.ndarray
    ) -> dict[str, np.ndarray]:
        """A bare array goes to the model's only input, whose name discovery tells once."""
        key = (model, version)
        if key not in self._input_names:
            found = [m for m in await self.models(until=serves(model, version)) if m.name == model]
            found = [m for m in found if version in (None, m.version)]
            if not found:
                raise ModelNotFound(
                    f"no worker serves {infer_subject(model, version)}", model=model
                )
            names = [spec.name for spec in found[-1].signature.inputs]
            if len(names) != 1:
                raise BadInput(
                    f"model has inputs {names}: pass a dict of named arrays", model=model
                )
            self._input_names[key] = names[0]
        return {self._input_names[key]: np.asarray(array)}

    async def models(
        self, *, timeout: float = 0.5, until: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[ModelInfo]:
        """Every model version served in the cluster, gathered from the workers' $SRV.INFO
        for ``timeout`` seconds (or until a reply satisfies ``until``)."""
        infos = await service_infos(self.nats, timeout=timeout, until=until)
        return models_from_infos(infos)


def _result(reply: Msg, model: str) -> InferResult:
    code = (reply.headers or {}).get(ERROR_CODE_HEADER)
    if code is not None:
        number = int(code) if code.isascii() and code.isdigit() else 500
        raise error_for_code(number, decode_error(reply.data), model=model)
    try:
        response = decode_response(reply.data)
    except BadInput as exc:  # the worker broke the protocol; the caller's input was fine
        raise EngineFailure(f"malformed reply: {exc.message}", model=model) from exc
    return InferResult(response.outputs, response.model_name, response.model_version, response.id)


def connect(
    servers: str | Sequence[str] | None = None,
    *,
    name: str = "inferbus-client",
    creds: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Client:
    """A client for ``servers`` (default ``$INFERBUS_SERVERS`` or nats://127.0.0.1:4222).

    Use it as ``async with inferbus.connect(...) as client``. ``creds`` is a NATS credentials
    file (default ``$INFERBUS_CREDS``); ``tls_*`` are PEM paths for TLS.
    """
    settings: dict[str, Any] = {"name": name, "tls_ca": tls_ca, "tls_cert": tls_cert}
    settings["tls_key"] = tls_key
    if servers is not None:
        settings["servers"] = split_servers(servers if isinstance(servers, str) else list(servers))
    if creds is not None:
        settings["creds"] = creds
    return Client(ConnectOptions(**settings))
