"""Hostile traffic (issue 10): the attacks shared by tests/test_hostile.py and
scripts/hostile_check.py.

Every attacker talks to 127.0.0.1 only, and every loop here is bounded in count and in time.
Workers whose memory is measured, or that must survive an attack that kills them, run as
``python -m inferbus worker`` child processes (``WorkerProcess``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np
import onnx
import orjson
import simplejpeg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from onnx import TensorProto, helper

import inferbus
from inferbus.pipeline import transfer
from tests.conftest import EXAMPLE_MODELS, ROOT, TEST_MODELS

MIB: Final = 1 << 20
GIB: Final = 1 << 30
# A header block whose status line is not UTF-8: nats-py 2.16 decodes it outside any try.
POISON_HEADERS: Final = b"NATS/1.0 \xff\xfe\r\n\r\n"
# nats-server's max_control_line is 4096: the attacker's own PUB line must fit; a worker must
# refuse the subject all the same (PROTOCOL.md 14: at most 1024 bytes).
LONG_REPLY_CHARS: Final = 4040
ERROR_CODE: Final = "Nats-Service-Error-Code"
READY_S: Final = 60.0  # a child worker loads onnxruntime on a busy machine
STOP_S: Final = 5.0
MAX_TRANSFER_S: Final = 120.0  # the longest a receiver keeps a transfer open (PROTOCOL.md §13)


ADD: Final = {"x": np.ones((1, 4), dtype=np.float32)}


def long_reply_subject(chars: int = LONG_REPLY_CHARS) -> str:
    """Valid tokens, ``chars`` characters in all."""
    token = "r" * 63
    return ".".join([token] * (chars // 64 + 1))[:chars].rstrip(".")


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("nats://").rpartition(":")
    return host, int(port)


# --- NATS spoken byte by byte ------------------------------------------------------------------


class RawConnection:
    """A NATS client connection written by hand: for messages nats-py would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str, timeout: float = 5.0) -> RawConnection:
        host, port = host_port(url)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        info = await asyncio.wait_for(reader.readline(), timeout)
        if not info.startswith(b"INFO "):
            writer.close()
            raise RuntimeError(f"not a NATS server: {info[:80]!r}")
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        return cls(reader, writer)

    @staticmethod
    def message(subject: str, payload: bytes, reply: str = "", headers: bytes = b"") -> bytes:
        """One PUB (or HPUB, with a raw header block) as it goes on the wire."""
        target = f"{subject} {reply}".strip().encode()
        if headers:
            total = len(headers) + len(payload)
            return b"HPUB %s %d %d\r\n%s%s\r\n" % (target, len(headers), total, headers, payload)
        return b"PUB %s %d\r\n%s\r\n" % (target, len(payload), payload)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def flush(self, timeout: float = 5.0) -> None:
        """PING, and wait for the server's PONG: everything before it was processed."""
        self.writer.write(b"PING\r\n")
        await self.writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if line.startswith(b"-ERR") or not line:
                    raise RuntimeError(f"server refused the raw connection: {line!r}")
                if line.startswith(b"PONG"):
                    return

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def poison(url: str, subject: str) -> None:
    """Publish one message to ``subject`` whose header status line is not UTF-8."""
    connection = await RawConnection.open(url)
    try:
        connection.write(RawConnection.message(subject, b"", headers=POISON_HEADERS))
        await connection.flush()
    finally:
        await connection.close()


async def flood(url: str, subject: str, body: bytes, *, rate: float, seconds: float) -> int:
    """Publish ``body`` to ``subject`` with a reply inbox nobody reads, ``rate`` per second for
    ``seconds``, without waiting for replies; the number of messages sent."""
    connection = await RawConnection.open(url)
    message = RawConnection.message(subject, body, reply="_INBOX.hostile.flood")
    tick, sent, owed = 0.005, 0, 0.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while (elapsed := loop.time() - started) < seconds:
            owed = rate * elapsed - sent
            count = int(owed)
            if count > 0:
                connection.write(message * count)
                sent += count
                await asyncio.wait_for(connection.writer.drain(), seconds)
            await asyncio.sleep(tick)
    finally:
        await connection.close()
    return sent


# --- the worker as a child process -------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


class PeakMeter:
    """Peak RSS growth of a process from now on: VmHWM is reset to the current RSS
    (``clear_refs`` 5) where Linux allows it; otherwise growth above the old peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.base_kib = status_kib(pid, "VmRSS")
        except OSError:
            self.base_kib = status_kib(pid, "VmHWM")

    def growth_mib(self) -> float:
        return max(status_kib(self.pid, "VmHWM") - self.base_kib, 0) / 1024


class WorkerProcess:
    """``python -m inferbus worker <repo> --model ... --servers <url>``: started and waited
    for (until it prints "worker ready") by ``with``, stopped (SIGTERM, then SIGKILL) after."""

    def __init__(self, url: str, repo: Path, *models: str) -> None:
        flags = [arg for model in models for arg in ("--model", model)]
        self.command = [
            sys.executable, "-m", "inferbus", "--log-level", "WARNING", "worker", str(repo),
            *flags, "--servers", url,
        ]  # fmt: skip
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def process(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise RuntimeError("worker process not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return "".join(self.lines[-40:])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "worker ready" in line:
                self._ready.set()

    def __enter__(self) -> WorkerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(
            self.command, cwd=ROOT, env=env, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + READY_S
        while not self._ready.wait(0.05):
            if not self.alive or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker did not start:\n{self.output()}")
        return self

    def kill(self) -> None:
        """SIGKILL: for a worker whose drain would take long (a flooded one)."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_S)
            except subprocess.TimeoutExpired:  # a worker whose connection is wedged
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(STOP_S)
        if process.stdout is not None:
            process.stdout.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- a model repository for the attacks --------------------------------------------------------


def write_image_model(folder: Path) -> Path:
    """Identity on UINT8 images [batch, 8, 8, 3] (x → y), the shape the jpeg codec carries."""
    folder.mkdir(parents=True)
    dims: list[str | int] = ["batch", 8, 8, 3]
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, dims)
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "image", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    (folder / "config.toml").write_text('name = "image"\nfile = "model.onnx"\nmax_batch_size = 8\n')
    return folder


BIG_MAX_REQUEST: Final = 64 * MIB


def hostile_repo(folder: Path) -> Path:
    """The attacks' targets: ``add`` (v1), ``digits`` (on the event loop), ``image`` and
    ``big`` (UINT8 identity taking requests of up to 64 MiB)."""
    shutil.copytree(TEST_MODELS / "add_v1", folder / "add")
    shutil.copytree(TEST_MODELS / "blob", folder / "big")
    (folder / "big" / "config.toml").write_text(
        'name = "big"\nfile = "model.onnx"\nmax_batch_size = 262144\nexecution = "thread"\n'
        f"max_request_bytes = {BIG_MAX_REQUEST}\n"
    )
    shutil.copytree(EXAMPLE_MODELS / "digits", folder / "digits")
    with (folder / "digits" / "config.toml").open("a") as config:
        config.write('execution = "inline"\n')
    write_image_model(folder / "image")
    return folder


# --- bodies ------------------------------------------------------------------------------------


def entry(name: str, datatype: str, shape: list[int], size: int, codec: str = "") -> dict[str, Any]:
    parameters: dict[str, Any] = {"binary_data_size": size}
    if codec:
        parameters["codec"] = codec
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": parameters}


def frame(header: dict[str, Any], data: bytes = b"") -> bytes:
    """u32 LE length ‖ JSON ‖ tensor data (PROTOCOL.md section 3)."""
    json = orjson.dumps(header)
    return struct.pack("<I", len(json)) + json + data


def tensor_body(request_id: str, tensor: dict[str, Any], data: bytes) -> bytes:
    return frame({"id": request_id, "inputs": [tensor]}, data)


ZSTD_BLOCK: Final = 128 * 1024  # the largest block; an RLE block holds it in 4 bytes


def zstd_zeros(zeros: int, prefix: bytes = b"", declared: int | None = None) -> bytes:
    """One zstd frame of ``prefix`` (a raw block) then ``zeros`` zero bytes (RLE blocks);
    its header declares ``declared`` bytes (default: the truth)."""
    size = len(prefix) + zeros if declared is None else declared
    out = bytearray(b"\x28\xb5\x2f\xfd\xe0") + size.to_bytes(8, "little")  # single segment
    blocks: list[tuple[int, int, bytes]] = [(0, len(prefix), prefix)] if prefix else []
    blocks += [(1, min(ZSTD_BLOCK, zeros - at), b"\0") for at in range(0, zeros, ZSTD_BLOCK)]
    for index, (kind, length, content) in enumerate(blocks):
        last = index == len(blocks) - 1
        out += (int(last) | kind << 1 | length << 3).to_bytes(3, "little") + content
    return bytes(out)


def tiny_jpeg(side: int = 8, *, noisy: bool = False) -> bytes:
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    if noisy:  # noise does not compress: a larger file for the same header trick
        pixels = np.random.default_rng(side).integers(0, 256, pixels.shape, dtype=np.uint8)
    return bytes(simplejpeg.encode_jpeg(pixels, 95 if noisy else 75, "RGB", "420"))


def patch_jpeg_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The same JPEG with its SOF0 header claiming ``height`` x ``width`` pixels."""
    at = jpeg.find(b"\xff\xc0")
    if at < 0:
        raise ValueError("no SOF0 marker: not a baseline JPEG")
    # FF C0, length (2), precision (1), height (2), width (2): big-endian.
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


@dataclass(frozen=True, slots=True)
class Bomb:
    """A small body that decodes to something huge, and the subject it is sent to."""

    name: str
    subject: str
    body: bytes


def bytes_bomb() -> Bomb:
    """A BYTES tensor for ``add``'s FP32 ``x``: one element of 256 MiB in a ~8 KB zstd frame."""
    element = 256 * MIB
    data = zstd_zeros(element + 12, prefix=struct.pack("<I", element))  # 3 more empty elements
    tensor = entry("x", "BYTES", [1, 4], len(data), "zstd")
    return Bomb(
        "zstd BYTES, 256 MiB in one element", "inferbus.infer.add", tensor_body("a", tensor, data)
    )


def batch_bomb(name: str = "pixels") -> Bomb:
    """digits' FP32 ``pixels`` [2,000,000, 64] (488 MiB) in a ~16 KB zstd frame."""
    rows = 2_000_000
    data = zstd_zeros(rows * 64 * 4)
    tensor = entry(name, "FP32", [rows, 64], len(data), "zstd")
    label = "batch of 2,000,000 rows" if name == "pixels" else f"unknown input {name!r}"
    return Bomb(f"zstd FP32, {label}", "inferbus.infer.digits", tensor_body("b", tensor, data))


def jpeg_bomb(*, noisy: bool = False) -> Bomb:
    """An 8x8 JPEG whose header claims 10000x12000 (360 MB decoded), for ``image``."""
    jpeg = patch_jpeg_size(tiny_jpeg(96 if noisy else 8, noisy=noisy), 10_000, 12_000)
    data = struct.pack("<I", len(jpeg)) + jpeg
    tensor = entry("x", "UINT8", [1, 10_000, 12_000, 3], len(data), "jpeg")
    return Bomb("JPEG claiming 10000x12000", "inferbus.infer.image", tensor_body("d", tensor, data))


BOMBS: Final[dict[str, Callable[[], Bomb]]] = {
    "bytes": bytes_bomb,
    "batch": batch_bomb,
    "unknown_name": lambda: batch_bomb("not_an_input"),
    "jpeg": jpeg_bomb,
}


def transfer_bombs() -> list[Bomb]:
    """Six bombs, each longer than an 8 KiB max_payload, so each goes as a chunked transfer."""
    return [
        bytes_bomb(),
        batch_bomb(),
        batch_bomb("not_an_input"),
        jpeg_bomb(noisy=True),
        batch_bomb(),
        batch_bomb("also_not_an_input"),
    ]


def small_add_body(request_id: str = "small") -> bytes:
    tensor = entry("x", "FP32", [1, 4], 16)
    return tensor_body(request_id, tensor, np.ones((1, 4), dtype=np.float32).tobytes())


def digits_body(request_id: str = "row") -> bytes:
    tensor = entry("pixels", "FP32", [1, 64], 256)
    return tensor_body(request_id, tensor, np.zeros((1, 64), dtype=np.float32).tobytes())


def error_code(msg: Msg) -> int | None:
    """The reply's ``Nats-Service-Error-Code`` (None for a success reply)."""
    code = (msg.headers or {}).get(ERROR_CODE)
    return int(code) if code is not None and code.isdigit() else None


# --- what a worker reports ---------------------------------------------------------------------


async def endpoint_data(nats: NatsClient, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """Each endpoint's ``$SRV.STATS`` data, by endpoint name (the one worker that answers)."""
    reply = await nats.request("$SRV.STATS.inferbus", b"", timeout=timeout)
    stats = orjson.loads(reply.data)
    return {e["name"]: e.get("data") or {} for e in stats["endpoints"]}


async def dropped_count(nats: NatsClient, model: str) -> int:
    """``dropped_count`` of ``model`` (its endpoints share one version's data)."""
    data = await endpoint_data(nats)
    counts = [
        int(d.get("dropped_count", 0))
        for name, d in data.items()
        if name == model or name.startswith(f"{model}_v")
    ]
    return max(counts, default=0)


async def until(condition: Callable[[], Awaitable[bool]], seconds: float, every: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while True:
        if await condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


# --- a transfer that drips ---------------------------------------------------------------------


class Dripper:
    """A chunked transfer offered at full size, then fed one small chunk at a time."""

    def __init__(self, nats: NatsClient, subject: str, size: int, chunk: int = 4096) -> None:
        self.nats = nats
        self.subject = subject
        self.offer = transfer.Offer(size, chunk, MAX_TRANSFER_S)
        self.target = ""
        self.sent = 0

    async def open(self, timeout: float = 5.0) -> int | None:
        """Offer the transfer; None when accepted, else the refusal's code."""
        answer = await self.nats.request(
            self.subject,
            self.offer.body(),
            headers={transfer.TRANSFER_HEADER: transfer.OFFER},
            timeout=timeout,
        )
        code = error_code(answer)
        if code is None:
            self.target = transfer.transfer_json(answer.data)["subject"]
        return code

    async def drip(self, timeout: float = 2.0) -> bool:
        """Send the next chunk; True when it was acknowledged without error."""
        part = bytes(self.offer.chunk_size)
        headers = {transfer.CHUNK_HEADER: f"{self.sent} {zlib.crc32(part)}"}
        self.sent += 1
        try:
            ack = await self.nats.request(self.target, part, headers=headers, timeout=timeout)
        except NatsError:  # no responders, or no answer: the receiver gave up
            return False
        return error_code(ack) is None


# --- a fake worker that answers with crafted replies -------------------------------------------


def request_id_of(body: bytes) -> str:
    length = int.from_bytes(body[:4], "little")
    request_id = orjson.loads(body[4 : 4 + length]).get("id", "")
    return str(request_id)


def response_body(request_id: str, tensor: dict[str, Any], data: bytes) -> bytes:
    header = {"id": request_id, "model_name": "evil", "model_version": "1", "outputs": [tensor]}
    return frame(header, data)


def inflating_reply(request_id: str, decoded: int) -> bytes:
    """A success reply whose FP32 output is a zstd frame of ``decoded`` zero bytes (~32 KB for
    1 GiB)."""
    data = zstd_zeros(decoded)
    tensor = entry("y", "FP32", [decoded // 4], len(data), "zstd")
    return response_body(request_id, tensor, data)


def small_reply(request_id: str) -> bytes:
    tensor = entry("y", "FP32", [1, 4], 16)
    return response_body(request_id, tensor, np.zeros((1, 4), dtype=np.float32).tobytes())


Answer = Callable[[NatsClient, Msg], Awaitable[None]]


def offer_answer(size: int, chunk: int = MIB) -> Answer:
    """Answer with a reply transfer offer of ``size`` bytes; if the caller fetches from it,
    serve the first chunk (which is when a client allocates the whole body)."""

    async def answer(nats: NatsClient, msg: Msg) -> None:
        subject = f"inferbus.transfer.evil{secrets.token_hex(8)}"
        fetches = await nats.subscribe(subject, max_msgs=1)
        try:
            offer = transfer.Offer(size, chunk, 10.0, subject)
            headers = {transfer.TRANSFER_HEADER: transfer.OFFER}
            await nats.publish(msg.reply, offer.body(), headers=headers)
            fetch = await fetches.next_msg(timeout=5)
            if (fetch.headers or {}).get(transfer.CHUNK_HEADER) == transfer.CANCEL:
                return  # refused: nothing was allocated
            part = bytes(chunk)
            headers = {transfer.CHUNK_HEADER: f"0 {zlib.crc32(part)}"}
            await nats.publish(fetch.reply, part, headers=headers)
        finally:
            await fetches.unsubscribe()

    return answer


def body_answer(make: Callable[[str], bytes]) -> Answer:
    """Answer with the body ``make`` builds from the request's id."""

    async def answer(nats: NatsClient, msg: Msg) -> None:
        await nats.publish(msg.reply, make(request_id_of(msg.data)))

    return answer


class EvilWorker:
    """A raw nats-py subscriber on ``inferbus.infer.<model>`` that answers every request with
    ``answer`` (each in its own task, so that several requests are answered at once)."""

    def __init__(self, nats: NatsClient, answer: Answer, model: str = "evil") -> None:
        self.nats = nats
        self.answer = answer
        self.subject = f"inferbus.infer.{model}"
        self.requests = 0
        self.failures: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None

    async def _answer(self, msg: Msg) -> None:
        try:
            await self.answer(self.nats, msg)
        except (NatsError, TimeoutError) as exc:  # the victim hung up: that is its right
            self.failures.append(exc)

    async def _on_request(self, msg: Msg) -> None:
        self.requests += 1
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> EvilWorker:
        self._subscription = await self.nats.subscribe(self.subject, cb=self._on_request)
        await self.nats.flush()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- measuring -------------------------------------------------------------------------------


async def answered_again(client: inferbus.Client, model: str, seconds: float) -> float | None:
    """Seconds until a short request to ``model`` succeeds, trying for ``seconds``; or None."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        with contextlib.suppress(inferbus.InferbusError):
            await client.infer(model, ADD, timeout=1.0)
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def send_in_chunks(raw: NatsClient, subject: str, body: bytes) -> Msg:
    """Send ``body`` as a chunked transfer (as the client does); its reply."""
    return await transfer.send(raw, subject, body, timeout=10)


async def capacity(raw: NatsClient, subject: str, body: bytes, seconds: float = 0.5) -> float:
    """Requests a second answered with 16 callers in a closed loop."""
    done = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def caller() -> None:
        nonlocal done
        while loop.time() < end:
            await raw.request(subject, body, timeout=5)
            done += 1

    started = loop.time()
    await asyncio.gather(*(caller() for _ in range(16)))
    return done / (loop.time() - started)
