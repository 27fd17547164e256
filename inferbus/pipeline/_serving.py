"""One model version's request path on a worker: check, compute off the loop, reply."""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from inferbus.codecs import (
    InferRequest,
    InferResponse,
    Tensors,
    decode_request,
    encode_error,
    encode_response,
)
from inferbus.engines import Engine
from inferbus.errors import (
    BadInput,
    DeadlineExceeded,
    EngineFailure,
    PayloadTooLarge,
    RequestError,
)
from inferbus.pipeline._service import EndpointRecord
from inferbus.pipeline._threads import run_in_thread
from inferbus.pipeline.subjects import ERROR_CODE_HEADER, ERROR_HEADER

_MAX_HEADER_TEXT: Final = 512

log = logging.getLogger("inferbus.worker")


def error_headers(error: RequestError) -> dict[str, str]:
    # Header values are one line: CR/LF would end the header block early.
    text = " ".join(error.message.split())[:_MAX_HEADER_TEXT]
    return {ERROR_HEADER: text, ERROR_CODE_HEADER: str(error.code)}


class ServedModel:
    """A loaded engine and the counters its endpoints report."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.signature = engine.signature
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.instances, thread_name_prefix=f"inferbus-{self.config.name}"
        )
        self.inference_count = 0
        self.compute_ns = 0
        self.errors_by_code: Counter[int] = Counter()
        self._output_names = frozenset(spec.name for spec in self.signature.outputs)
        self._batched = all(spec.shape[:1] == (-1,) for spec in self.signature.inputs)

    def metadata(self) -> dict[str, str]:
        """Endpoint metadata: ADR-32 allows only strings, so the signature is JSON text."""
        return {
            "model": self.config.name,
            "version": str(self.config.version),
            "engine": self.engine.backend or type(self.engine).__name__,
            "device": self.engine.device,
            "max_batch_size": str(self.config.max_batch_size),
            "signature": orjson.dumps(self.signature.to_dict()).decode(),
        }

    def stats_data(self) -> dict[str, Any]:
        return {
            "inference_count": self.inference_count,
            "compute_ns": self.compute_ns,
            "errors_by_code": {str(code): n for code, n in sorted(self.errors_by_code.items())},
        }

    async def handle(self, client: NatsClient, msg: Msg, record: EndpointRecord) -> None:
        """Answer one request; every failure becomes a coded error reply."""
        started = time.perf_counter_ns()
        headers: dict[str, str] | None = None
        error: str | None = None
        try:
            body = await self._answer(msg, client.max_payload)
        except Exception as exc:  # every request gets an answer, whatever went wrong
            failure = exc if isinstance(exc, RequestError) else _internal(exc, self.config.name)
            failure.model = self.config.name
            body, headers, error = (
                encode_error(failure.message),
                error_headers(failure),
                str(failure),
            )
            self.errors_by_code[failure.code] += 1
        await client.publish(msg.reply, body, headers=headers)
        record.observe(time.perf_counter_ns() - started, error)

    async def _answer(self, msg: Msg, max_payload: int) -> bytes:
        received = time.monotonic()
        if len(msg.data) > self.config.max_request_bytes:
            raise PayloadTooLarge(
                f"request of {len(msg.data)} bytes exceeds max_request_bytes "
                f"{self.config.max_request_bytes}"
            )
        request = decode_request(msg.data)
        self._check(request)
        deadline = None if request.timeout_us is None else received + request.timeout_us / 1e6
        body = await run_in_thread(self.executor, self._compute, request, deadline)
        if len(body) > max_payload:
            raise PayloadTooLarge(
                f"reply of {len(body)} bytes exceeds the NATS server's max_payload {max_payload}"
            )
        return body

    def _check(self, request: InferRequest) -> None:
        self.signature.check_inputs(request.inputs)
        unknown = set(request.outputs) - self._output_names
        if unknown:
            raise BadInput(f"unknown outputs {sorted(unknown)}; has {sorted(self._output_names)}")
        if self._batched and request.inputs:
            batch = max(array.shape[0] for array in request.inputs.values())
            if batch > self.config.max_batch_size:
                raise PayloadTooLarge(
                    f"batch of {batch} exceeds max_batch_size {self.config.max_batch_size}"
                )

    def _compute(self, request: InferRequest, deadline: float | None) -> bytes:
        """Runs on the model's executor: the engine call and the encoding of its outputs."""
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the time budget ran out before compute; the engine was skipped")
        started = time.perf_counter_ns()
        outputs = self._run_engine(request.inputs)
        self.compute_ns += time.perf_counter_ns() - started
        self.inference_count += 1
        missing = (set(request.outputs) or self._output_names) - outputs.keys()
        if missing:
            raise EngineFailure(f"the engine did not return outputs {sorted(missing)}")
        if request.outputs:
            outputs = {name: outputs[name] for name in request.outputs}
        response = InferResponse(
            request.id, self.config.name, str(self.config.version), dict(outputs)
        )
        try:
            return encode_response(response)
        except BadInput as exc:  # the engine's output, not the caller's input, is at fault
            raise EngineFailure(f"cannot encode the engine's outputs: {exc.message}") from exc

    def _run_engine(self, inputs: Tensors) -> Tensors:
        try:
            return self.engine(inputs)
        except RequestError:
            raise
        except Exception as exc:  # a user's hook or a backend: the caller gets a 500, we a log
            log.exception("%s: engine failed", self.config.name)
            raise EngineFailure(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.engine.close()


def _internal(exc: Exception, model: str) -> EngineFailure:
    log.exception("%s: unexpected error while serving a request", model)
    return EngineFailure(f"internal error: {type(exc).__name__}: {exc}")
