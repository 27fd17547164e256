"""The code's boundaries hold: private modules stay in their package, NATS errors are
translated in one place, the application end loads no model-end libraries, modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from inferbus.errors import DeadlineExceeded, ModelNotFound, RequestError, Unavailable
from inferbus.pipeline.nats_errors import nats_errors

ROOT = Path(__file__).resolve().parent.parent
TREES = ("inferbus", "scripts", "examples", "tests")
MAX_PIPELINE_LINES = 300


def _python_files() -> Iterator[Path]:
    for tree in TREES:
        yield from sorted((ROOT / tree).rglob("*.py"))


def _package(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parent.parts)


def _imports(path: Path) -> Iterator[tuple[str, str]]:
    """(module, name) for every import; name is "" for ``import module``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield from ((node.module, alias.name) for alias in node.names)


def _private_part(module: str, name: str) -> str | None:
    """The package that owns the first private part of ``module.name``, if any."""
    parts = [*module.split("."), name] if name else module.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:index])
    return None


def test_no_module_imports_another_packages_private_parts() -> None:
    offences = []
    for path in _python_files():
        for module, name in _imports(path):
            if not module.startswith(("inferbus", "tests")):
                continue
            owner = _private_part(module, name)
            # tests/_datatypes.py is shared by the tests package itself
            if owner is not None and owner != _package(path):
                offences.append(f"{path.relative_to(ROOT)}: {module} {name}".strip())
    assert offences == []


def test_nats_privates_are_never_touched() -> None:
    offences = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {
                "_nuid",
                "_subs",
                "_pending_data_size",
                "_ps",
            }:
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert offences == []


def test_nats_errors_are_translated_in_one_place() -> None:
    """Only pipeline/nats_errors.py names nats-py's request errors (httpx's map_exceptions)."""
    nats_names = {"NoRespondersError", "ConnectionClosedError", "TimeoutError"}
    users = set()
    for path in (ROOT / "inferbus").rglob("*.py"):
        for module, name in _imports(path):
            if module == "nats.errors" and name in nats_names:
                users.add(path.relative_to(ROOT).as_posix())
    assert users == {"inferbus/pipeline/nats_errors.py"}


@pytest.mark.parametrize(
    ("raised", "expected", "nobody"),
    [
        (NoRespondersError(), ModelNotFound, ModelNotFound),
        (NoRespondersError(), Unavailable, Unavailable),
        (NatsTimeoutError(), DeadlineExceeded, ModelNotFound),
        (ConnectionClosedError(), Unavailable, ModelNotFound),
    ],
)
def test_every_nats_request_error_becomes_a_request_error(
    raised: Exception, expected: type[RequestError], nobody: type[RequestError]
) -> None:
    with pytest.raises(expected) as caught, nats_errors("inferbus.infer.m", 1.5, nobody=nobody):
        raise raised
    assert caught.value.__cause__ is None or caught.value.__cause__ is raised
    if expected is DeadlineExceeded:
        assert caught.value.silent  # type: ignore[attr-defined]  # nothing came back at all


def test_the_application_end_loads_no_model_end_library() -> None:
    """Sending a request needs neither engines, onnxruntime, torch nor prometheus-client."""
    probe = (
        "import sys, inferbus\n"
        "from inferbus import connect, Client, Model, InferResult, RetryPolicy, ConnectOptions\n"
        "heavy = ('onnxruntime', 'torch', 'prometheus_client', 'inferbus.engines',"
        " 'inferbus.pipeline.worker')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
        "inferbus.Worker  # model-end names still resolve, on first use\n"
        "print('inferbus.engines' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.splitlines() == ["[]", "True"]


def test_pipeline_modules_stay_small() -> None:
    sizes = {
        path.name: len(path.read_text().splitlines())
        for path in (ROOT / "inferbus" / "pipeline").glob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > MAX_PIPELINE_LINES} == {}
