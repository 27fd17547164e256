"""The README's code, the example app, and the ``inferbus`` command, run for real."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import orjson
import pytest

import inferbus
from inferbus import cli
from tests.conftest import EXAMPLE_MODELS, ROOT


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


@pytest.mark.usefixtures("worker")
async def test_digits_app_matches_in_process_accuracy(
    nats_server: inferbus.EmbeddedServer,
) -> None:
    app = load_example_app()
    report = await app.classify(
        nats_server.url, EXAMPLE_MODELS, ROOT / "examples/data/digits_heldout.npz"
    )
    assert report.accuracy >= 0.95
    assert report.accuracy == report.local_accuracy
    np.testing.assert_array_equal(report.predictions, report.local_predictions)
    assert "latency p99" in report.table()


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def shown_output(block: str) -> list[str]:
    """The output the README shows for a block: the comment after each ``print(...)``."""
    return re.findall(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$", block, flags=re.MULTILINE)


README_BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_readme_has_python_blocks_that_show_their_output() -> None:
    assert len(README_BLOCKS) >= 2
    assert any(shown_output(block) for block in README_BLOCKS)


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("index", range(len(README_BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_python_block_runs_and_prints_what_it_shows(
    index: int,
    nats_server: inferbus.EmbeddedServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each block, run as the script it is (here, in this process, against the shared
    worker, which serves examples/models), prints the lines its comments show, in order."""
    block = README_BLOCKS[index]
    monkeypatch.setenv("INFERBUS_SERVERS", nats_server.url)
    exec(compile(block, f"README.md python block {index + 1}", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out.splitlines()
    lines = iter(printed)
    for expected in shown_output(block):
        assert expected in lines, (
            f"block {index + 1} printed {printed}; the README shows {expected!r}"
        )


@pytest.mark.parametrize(
    "command",
    ["", "server", "roster", "worker", "up", "models", "status", "infer", "bench", "build", "demo"],
)
def test_every_command_explains_itself(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*([command] if command else []), "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: inferbus" in out
    if command in ("worker", "models", "infer"):
        assert "--servers" in out
        assert "--creds" in out


@pytest.mark.usefixtures("worker")
def test_models_and_infer_commands(
    nats_server: inferbus.EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands' main() in this process (``python -m inferbus`` runs in the demo test)."""
    servers = ["--servers", nats_server.url]
    assert cli.main(["models", "--json", *servers]) == 0
    names = {(m["name"], m["version"]) for m in orjson.loads(capsys.readouterr().out)}
    assert ("add", 2) in names
    np.save(tmp_path / "x.npy", np.full((1, 4), 5, dtype=np.float32))
    x = f"x={tmp_path / 'x.npy'}"
    assert cli.main(["infer", "add", "--version", "1", "--input", x, *servers]) == 0
    assert "[[6. 6. 6. 6.]]" in capsys.readouterr().out
    assert cli.main(["infer", "nope", "--input", x, *servers]) == 1
    assert "no worker serves inferbus.infer.nope" in capsys.readouterr().err


def test_commands_fail_clearly_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--servers", "nats://127.0.0.1:1"]) == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in capsys.readouterr().err
    assert cli.main(["worker", "no/such/repo", "--servers", "nats://127.0.0.1:1"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_demo_runs_from_an_installed_wheel_anywhere(tmp_path: Path) -> None:
    """``inferbus demo`` as a pip user gets it: the wheel built from this tree, installed into a
    folder of its own, run from an empty folder outside the repository."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy: setuptools builds in the source folder, and a stale build/ there
    # could put files in the wheel that the tree no longer has.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests")
    shutil.copytree(ROOT, source, ignore=skip)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    (wheel,) = wheels.glob("inferbus-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    # The wheel's inferbus first on the path; its dependencies from this environment. The
    # model store in a folder of its own, not in this machine's ~/.local/share.
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_DATA_HOME": str(tmp_path / "data")}
    code = "import inferbus; print(inferbus.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.startswith(str(site)), where.stdout
    result = subprocess.run([sys.executable, "-m", "inferbus", "demo"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=90, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accuracy, remote  0.9" in result.stdout
    assert "360/360 predictions identical" in result.stdout
    assert "worker stopped (exit 0)" in result.stdout
    assert list(elsewhere.iterdir()) == []  # nothing left behind in the user's folder


def test_demo_through_the_model_store(tmp_path: Path) -> None:
    """deploy → infer → undeploy, with a worker that serves only the store."""
    result = run_cli("demo", "--store", "--store-dir", str(tmp_path / "js"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started worker" in result.stdout
    assert "for the model store" in result.stdout
    assert "deployed digits v1" in result.stdout
    assert "360/360 predictions identical" in result.stdout
    assert "undeployed digits.1" in result.stdout
    assert "nothing is deployed" in result.stdout


def test_gpu_check_runs_and_reports_what_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On this CPU machine: the CPU engines agree with the reference; GPU rows say why not.
    (Its main() in this process: torch is imported once for the whole session.)"""
    from scripts import gpu_check

    monkeypatch.setattr(sys, "argv", ["scripts/gpu_check.py", "--seconds", "0.05"])
    assert gpu_check.main() == 0
    stdout = capsys.readouterr().out
    rows = {line.split()[0] + " " + line.split()[1]: line for line in stdout.splitlines()[2:]
            if len(line.split()) > 2}  # fmt: skip
    assert float(rows["onnxruntime cpu"].split()[2]) == 0.0
    assert float(rows["torch cpu"].split()[2]) < 1e-4
    assert "tensorrt" in stdout
    assert "cuda buffers:" in stdout
