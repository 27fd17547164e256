"""Public names are listed once, in inferbus.__all__; the embedded server starts and stops."""

from __future__ import annotations

import socket

import pytest

import inferbus
from inferbus.errors import RequestError, error_for_code


def test_exported_members() -> None:
    public = {name for name in dir(inferbus) if not name.startswith("_")}
    submodules = {
        "bench",
        "cli",
        "codecs",
        "contract",
        "dashboard",
        "engines",
        "errors",
        "example",
        "gateway",
        "natsserver",
        "pipeline",
        "repository",
        "roster",
        "status",
        "store",
        "sync",
        "tenancy",
        "version",
    }
    assert public - submodules == set(inferbus.__all__) - {"__version__"}
    for name in inferbus.__all__:
        assert getattr(inferbus, name) is not None


@pytest.mark.parametrize("code", [400, 404, 413, 429, 500, 503, 504])
def test_every_wire_code_maps_to_its_own_class(code: int) -> None:
    error = error_for_code(code, "message", model="m")
    assert error.code == code
    assert isinstance(error, RequestError)
    assert str(error) == f"[{code}] m: message"


def test_unknown_wire_code_is_an_engine_failure() -> None:
    assert isinstance(error_for_code(418, "teapot"), inferbus.EngineFailure)


def test_embedded_server_accepts_connections_then_stops() -> None:
    server = inferbus.EmbeddedServer(max_payload=1024 * 1024)
    with server:
        with socket.create_connection((server.host, server.port), timeout=2) as sock:
            assert sock.recv(4096).startswith(b"INFO ")
        assert "max_payload: 1048576" in server.config_text()
    with pytest.raises(OSError):  # noqa: PT011 - any refusal will do
        socket.create_connection((server.host, server.port), timeout=0.5).close()


def test_embedded_server_reports_a_port_in_use() -> None:
    with inferbus.EmbeddedServer() as first:
        second = inferbus.EmbeddedServer(port=first.port)
        with pytest.raises(inferbus.ServerError, match="exited"):
            second.start(timeout=5)


def test_max_payload_above_the_nats_cap_is_refused() -> None:
    with pytest.raises(inferbus.ServerError, match="64 MiB"):
        inferbus.EmbeddedServer(max_payload=65 * 1024 * 1024)
