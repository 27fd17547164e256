"""The HTTP gateway's cost, in one run: the digits model through `inferbus gateway` against the
same model over the bus directly, a trivial HTTP echo on the same stack (a bare ASGI app on
uvicorn: the HTTP floor), and LitServe serving the same ONNX file.

    python -m scripts.bench.gateway [--litserve-python /path/to/venv/bin/python]

LitServe runs from its own virtual environment (its FastAPI stack is not one of ours): without
``--litserve-python`` its rows are left out. Latencies at concurrency 1 come from aiohttp
(keep-alive); throughput at concurrency 64 from wrk (the Debian package) when it is installed,
since an asyncio client takes the CPU the servers need on a small machine, else from aiohttp.
The bus rows use the inferbus client. Targets (issue 14): the gateway's p50 at concurrency 1
within 1.5x of (bus p50 + HTTP floor p50); its throughput at concurrency 64 at least 10x
LitServe's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import orjson

import inferbus
from inferbus.natsserver import free_port
from scripts.bench import harness
from scripts.bench.models import Figure, table

ROOT = harness.ROOT
DIGITS = ROOT / "examples" / "models" / "digits"
ROW = np.random.default_rng(0).random((1, 64), dtype=np.float32)

# The HTTP floor: the body back, as a bare ASGI app on uvicorn (the gateway's infer path
# runs on uvicorn without Starlette's router; Starlette here would only lower the floor).
ECHO_APP = """
async def app(scope, receive, send):
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""

# wrk's request, read from files the benchmark writes (wrk's Lua cannot take arguments).
WRK_SCRIPT = """
wrk.method = "POST"
local file = io.open("{body}", "rb")
wrk.body = file:read("*all")
file:close()
{headers}
"""

LITSERVE_APP = """
import sys
import numpy as np
import onnxruntime as ort
import litserve as ls

class Digits(ls.LitAPI):
    def setup(self, device):
        self.session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    def decode_request(self, request):
        return np.asarray(request["pixels"], dtype=np.float32)
    def predict(self, x):
        return self.session.run(["logits"], {"pixels": x})[0]
    def encode_response(self, output):
        return {"logits": output.tolist()}

if __name__ == "__main__":
    ls.LitServer(Digits(), accelerator="cpu").run(port=int(sys.argv[2]))
"""


@contextlib.contextmanager
def http_process(command: list[str], port: int) -> Iterator[str]:
    """A server process, waited for until its port answers."""
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as process:  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url, timeout=0.2)
                break
            if process.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited with {process.returncode}")
        try:
            yield url
        finally:
            process.terminate()
            process.wait(30)


Rate = Callable[[], Awaitable[float]]


async def measure(call: harness.Call, rate: Rate | None = None) -> tuple[float, float]:
    """p50 at concurrency 1 (seconds) and requests/s at concurrency 64 (``rate``, or ``call``
    from 64 callers here)."""
    latencies = await harness.latencies(call, 500, warmup=50)
    rps = await rate() if rate is not None else await harness.throughput(call, 64, 3.0)
    return float(np.median(latencies)), rps


def wrk_rate(
    name: str, url: str, body: bytes, headers: dict[str, str], scratch: Path
) -> Rate | None:
    """Requests/s from wrk at 64 connections, or None without wrk: a C client leaves the
    servers the CPU an asyncio client takes (aiohttp capped every server here near 3,500 req/s,
    wrk near 12,000)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    body_file = scratch / f"{name}.bin"
    body_file.write_bytes(body)
    lines = "\n".join(f'wrk.headers["{key}"] = "{value}"' for key, value in headers.items())
    script = body_file.with_suffix(".lua")
    script.write_text(WRK_SCRIPT.format(body=body_file, headers=lines))

    async def rate() -> float:
        command = [wrk, "-t1", "-c64", "-d5s", "-s", str(script), url]
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
        out = (await process.communicate())[0].decode()
        if process.returncode != 0 or "Non-2xx" in out:
            raise RuntimeError(f"wrk against {url} failed:\n{out}")
        return float(out.split("Requests/sec:")[1].split()[0])

    return rate


def v2_body() -> tuple[bytes, dict[str, str]]:
    pixels = {"name": "pixels", "datatype": "FP32", "shape": [1, 64],
              "parameters": {"binary_data_size": ROW.nbytes}}  # fmt: skip
    logits = {"name": "logits", "parameters": {"binary_data": True}}
    header = orjson.dumps({"inputs": [pixels], "outputs": [logits]})
    return header + ROW.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                    "Content-Type": "application/octet-stream"}  # fmt: skip


async def run(litserve_python: str | None) -> list[Figure]:
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="inferbus-gateway-bench-") as scratch:
        echo_file = Path(scratch) / "echo_app.py"
        echo_file.write_text(ECHO_APP)
        lit_file = Path(scratch) / "lit_app.py"
        lit_file.write_text(textwrap.dedent(LITSERVE_APP))
        with inferbus.EmbeddedServer() as bus, harness.worker(bus.url, DIGITS.parent, "digits"):
            await harness.wait_for_models(bus.url, {"digits"})
            gw_port, echo_port = free_port(), free_port()
            gateway = [sys.executable, "-m", "inferbus", "gateway", "--servers", bus.url,
                       "--port", str(gw_port)]  # fmt: skip
            echo = [sys.executable, "-m", "uvicorn", "--app-dir", scratch, "echo_app:app",
                    "--port", str(echo_port), "--log-level", "warning"]  # fmt: skip
            body, headers = v2_body()
            async with (
                inferbus.connect(bus.url) as client,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http,
            ):

                async def bus_call() -> object:
                    return await client.infer("digits", {"pixels": ROW})

                results["bus"] = await measure(bus_call)
                with http_process(gateway, gw_port) as url:
                    infer = f"{url}/v2/models/digits/infer"

                    async def gateway_call() -> object:
                        async with http.post(infer, data=body, headers=headers) as reply:
                            return await reply.read()

                    rate = wrk_rate("gateway", infer, body, headers, Path(scratch))
                    results["gateway"] = await measure(gateway_call, rate)
                with http_process(echo, echo_port) as url:

                    async def echo_call() -> object:
                        async with http.post(f"{url}/echo", data=body) as reply:
                            return await reply.read()

                    rate = wrk_rate("echo", f"{url}/echo", body, {}, Path(scratch))
                    results["echo"] = await measure(echo_call, rate)
                if litserve_python:
                    lit_port = free_port()
                    lit = [
                        litserve_python,
                        str(lit_file),
                        str(DIGITS / "model.onnx"),
                        str(lit_port),
                    ]
                    with http_process(lit, lit_port) as url:
                        payload = {"pixels": ROW.tolist()}

                        async def lit_call() -> object:
                            async with http.post(f"{url}/predict", json=payload) as reply:
                                return await reply.read()

                        json_body = orjson.dumps(payload)
                        json_type = {"Content-Type": "application/json"}
                        rate = wrk_rate(
                            "litserve", f"{url}/predict", json_body, json_type, Path(scratch)
                        )
                        results["litserve"] = await measure(lit_call, rate)
    return figures(results)


def figures(results: dict[str, tuple[float, float]]) -> list[Figure]:
    (bus_p50, bus_rps), (gw_p50, gw_rps) = results["bus"], results["gateway"]
    echo_p50, echo_rps = results["echo"]
    floor = bus_p50 + echo_p50
    rows = [
        Figure("gateway: p50 at concurrency 1 (digits, binary V2)", f"{gw_p50 * 1e3:.2f} ms",
               f"{bus_p50 * 1e3:.2f} ms bus + {echo_p50 * 1e3:.2f} ms HTTP echo",
               gw_p50 / floor, "<= 1.5x", gw_p50 / floor <= 1.5),
        Figure("gateway: throughput at concurrency 64", f"{gw_rps:,.0f} req/s",
               f"{bus_rps:,.0f} req/s bus, {echo_rps:,.0f} req/s HTTP echo",
               gw_rps / echo_rps, "(vs the HTTP floor; no target)", True),
    ]  # fmt: skip
    if "litserve" in results:
        lit_p50, lit_rps = results["litserve"]
        rows.append(Figure("gateway vs LitServe 0.2.19: throughput at concurrency 64",
                           f"{gw_rps:,.0f} req/s", f"{lit_rps:,.0f} req/s LitServe (p50 "
                           f"{lit_p50 * 1e3:.2f} ms)", gw_rps / lit_rps, ">= 10x",
                           gw_rps / lit_rps >= 10))  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--litserve-python", help="python of a venv with litserve and onnxruntime")
    args = parser.parse_args()
    rows = asyncio.run(run(args.litserve_python))
    print(f"machine: {harness.machine()}")
    client = "wrk, 1 thread" if shutil.which("wrk") else "aiohttp (no wrk: it caps the servers)"
    print(f"HTTP throughput measured with {client}; p50s with aiohttp")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
