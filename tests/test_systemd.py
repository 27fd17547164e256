"""The systemd units pass `systemd-analyze verify` (where systemd-analyze exists)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = ROOT / "scripts" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", ["nats-server.service", "inferbus-worker@.service"])
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    # verify wants an instance of a template, and the binaries it names to exist.
    name = unit.replace("@.", "@digits.")
    text = (UNITS / unit).read_text().replace("/opt/inferbus/venv/bin", str(tmp_path))
    for binary in ("nats-server", "inferbus"):
        (tmp_path / binary).write_text("#!/bin/sh\n")
        (tmp_path / binary).chmod(0o755)
    (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [
        line for line in result.stderr.splitlines()
        # the test machine has no inferbus user or network target units: not the unit's fault
        if "inferbus" in line and "User" not in line and "Group" not in line
    ]  # fmt: skip
    assert not problems, result.stderr


def test_worker_unit_stops_after_the_drain() -> None:
    text = (UNITS / "inferbus-worker@.service").read_text()
    assert "KillSignal=SIGTERM" in text
    timeout = int(text.split("TimeoutStopSec=")[1].split()[0])
    assert timeout > 10  # longer than the default request budget, so the drain can finish
    assert "EnvironmentFile=/etc/inferbus/worker.env" in text
