"""The dashboard in a real browser: headless Chromium (Debian's package) loads the page, which
lists the workers and shows a model's rate rising while a load runs. The test keeps a
screenshot (``$INFERBUS_ARTIFACTS``, default the test's temporary folder)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

import inferbus
from inferbus.dashboard.app import Dashboard
from inferbus.dashboard.feed import frame
from inferbus.status import cluster_status
from tests.conftest import TEST_MODELS, worker_options

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here: `apt-get install chromium` (Debian) to run it"
)


@pytest.fixture
async def dashboard(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[str]:
    uvicorn = pytest.importorskip("uvicorn", reason="the gateway's HTTP server is not installed")
    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "add"]
    async with (
        inferbus.Worker(configs, worker_options(nats_server)),
        inferbus.connect(nats_server.url) as client,
    ):
        app = Dashboard(client.nats, interval=0.5)
        config = uvicorn.Config(app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)  # fmt: skip
        server = uvicorn.Server(config)
        with socket.create_server(("127.0.0.1", 0)) as listening:  # accepting before serve()
            serving = asyncio.create_task(server.serve(sockets=[listening]))
            yield f"http://127.0.0.1:{listening.getsockname()[1]}/"
            server.should_exit = True
            await serving
            await app.close()


async def browse(url: str, *extra: str) -> str:
    """What Chromium shows of ``url`` once it has loaded (its DOM, after its scripts ran)."""
    assert CHROMIUM is not None
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command = [CHROMIUM, *flags, *extra, url]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout


def rate_of(dom: str, model: str) -> float:
    match = re.search(
        rf"<td>{re.escape(model)}</td><td[^>]*>\d+</td><td[^>]*data-rate=\"([\d.]+)\"", dom
    )
    assert match, f"no row for {model} in the page:\n{dom[:3000]}"
    return float(match.group(1))


@needs_chromium
async def test_the_page_lists_workers_and_shows_a_rate_rising(
    dashboard: str, nats_server: inferbus.EmbeddedServer, tmp_path: Path
) -> None:
    idle = await browse(dashboard, "--dump-dom")
    assert "add v1, add v2" in idle  # the worker's row
    assert rate_of(idle, "add v1") == 0.0
    stop = asyncio.Event()

    async def load() -> None:
        async with inferbus.connect(nats_server.url) as client:
            while not stop.is_set():
                await client.infer("add", {"x": np.ones((1, 4), np.float32)}, version=1)

    loading = asyncio.create_task(load())
    try:
        busy = await browse(dashboard, "--dump-dom")
        artifacts = Path(os.environ.get("INFERBUS_ARTIFACTS", tmp_path))
        shot = artifacts / "dashboard.png"
        await browse(dashboard, f"--screenshot={shot}", "--window-size=1280,800")
    finally:
        stop.set()
        await loading
    assert rate_of(busy, "add v1") > 10
    assert shot.stat().st_size > 10_000


def test_a_frame_from_workers_replies() -> None:
    """The feed's arithmetic on replies as workers send them (no browser needed)."""
    stats = [{"id": "w1", "endpoints": [{
        "subject": "inferbus.infer.add.1",
        "data": {"request_count": 10, "failure_count": 1, "inference_count": 9,
                 "execution_count": 3, "batch_rows": 9, "queue_ns": 0, "compute_ns": 3_000_000,
                 "pending": 0, "errors_by_code": {"400": 1},
                 "compute_ms": {"p50": 0.5, "p99": 2.0}, "queue_ms": {"p50": 0.0, "p99": 0.1},
                 "users": {"alice": {"requests": 9, "rows": 9, "compute_s": 0.003, "refused": 1}}},
    }]}]  # fmt: skip
    infos = [{"id": "w1", "metadata": {"host": "gpu1", "pid": "7"}, "endpoints": [
        {"metadata": {"model": "add", "version": "1", "engine": "onnxruntime", "device": "cpu"}}
    ]}]  # fmt: skip
    body = frame(cluster_status(infos, stats), stats)
    (model,) = body["models"]
    assert (model["name"], model["version"], model["requests"]) == ("add", "1", 10)
    assert model["compute_p99_ms"] == 2.0
    assert model["errors_by_code"] == {"400": 1}
    assert body["workers"][0]["host"] == "gpu1"
    assert body["users"]["add v1"][0]["user"] == "alice"
