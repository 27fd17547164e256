"""The README's code, the example app, and the ``inferbus`` command, run for real."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import orjson
import pytest

import inferbus
from tests.conftest import EXAMPLE_MODELS, ROOT, TEST_MODELS


def load_example_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_app", ROOT / "examples/digits_app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["digits_app"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferbus", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@contextlib.contextmanager
def worker_process(url: str, repo: Path) -> Iterator[None]:
    process = subprocess.Popen(
        [sys.executable, "-m", "inferbus", "worker", str(repo), "--servers", url], cwd=ROOT
    )
    try:
        asyncio.run(_wait_for_models(url))
        yield
    finally:
        process.terminate()
        process.wait(timeout=20)


async def _wait_for_models(url: str) -> None:
    async with inferbus.connect(url) as client:
        for _ in range(200):
            if await client.models(timeout=0.1):
                return
    raise AssertionError("worker never announced its models")


@pytest.mark.usefixtures("worker")
async def test_digits_app_matches_in_process_accuracy(
    nats_server: inferbus.EmbeddedServer,
) -> None:
    app = load_example_app()
    configs = inferbus.load_repository(EXAMPLE_MODELS)
    from tests.conftest import worker_options

    async with inferbus.Worker(configs, worker_options(nats_server)):
        report = await app.classify(
            nats_server.url, EXAMPLE_MODELS, ROOT / "examples/data/digits_heldout.npz"
        )
    assert report.accuracy >= 0.95
    assert report.accuracy == report.local_accuracy
    np.testing.assert_array_equal(report.predictions, report.local_predictions)
    assert "latency p99" in report.table()


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_python_blocks_run(nats_server: inferbus.EmbeddedServer) -> None:
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    with worker_process(nats_server.url, EXAMPLE_MODELS):
        for block in blocks:
            result = subprocess.run(
                [sys.executable, "-c", block],
                cwd=ROOT,
                env={**os.environ, "INFERBUS_SERVERS": nats_server.url},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, f"{block}\n{result.stderr}"


@pytest.mark.parametrize(
    "command",
    ["", "server", "worker", "up", "models", "status", "infer", "bench", "build", "demo"],
)
def test_every_command_explains_itself(command: str) -> None:
    result = run_cli(*([command] if command else []), "--help")
    assert result.returncode == 0
    assert "usage: inferbus" in result.stdout
    if command in ("worker", "models", "infer"):
        assert "--servers" in result.stdout
        assert "--creds" in result.stdout


def test_models_and_infer_commands(nats_server: inferbus.EmbeddedServer, tmp_path: Path) -> None:
    env = {"INFERBUS_SERVERS": nats_server.url}
    with worker_process(nats_server.url, TEST_MODELS):
        listed = run_cli("models", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        names = {(m["name"], m["version"]) for m in orjson.loads(listed.stdout)}
        assert ("add", 2) in names
        np.save(tmp_path / "x.npy", np.full((1, 4), 5, dtype=np.float32))
        called = run_cli(
            "infer", "add", "--version", "1", "--input", f"x={tmp_path / 'x.npy'}", env=env
        )
        assert called.returncode == 0, called.stderr
        assert "[[6. 6. 6. 6.]]" in called.stdout
        missing = run_cli("infer", "nope", "--input", f"x={tmp_path / 'x.npy'}", env=env)
        assert missing.returncode == 1
        assert "no worker serves inferbus.infer.nope" in missing.stderr


def test_commands_fail_clearly_without_a_server() -> None:
    result = run_cli("models", "--servers", "nats://127.0.0.1:1")
    assert result.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.stderr
    bad_repo = run_cli("worker", "no/such/repo", "--servers", "nats://127.0.0.1:1")
    assert bad_repo.returncode == 1
    assert "is not a folder" in bad_repo.stderr


def test_demo_runs_end_to_end() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accuracy, remote  0.9" in result.stdout
    assert "360/360 predictions identical" in result.stdout
    assert "worker stopped (exit 0)" in result.stdout


def test_gpu_check_runs_and_reports_what_it_cannot_run() -> None:
    """On this CPU machine: the CPU engines agree with the reference; GPU rows say why not."""
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--seconds", "0.05"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line for line in result.stdout.splitlines()[2:]
            if len(line.split()) > 2}  # fmt: skip
    assert float(rows["onnxruntime cpu"].split()[2]) == 0.0
    assert float(rows["torch cpu"].split()[2]) < 1e-4
    assert "tensorrt" in result.stdout
    assert "cuda buffers:" in result.stdout
