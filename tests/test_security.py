"""Connections honour NATS authentication and TLS: real servers configured for each."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import inferbus
from inferbus.natsserver import free_port
from inferbus.pipeline.connection import ConnectOptions
from inferbus.tenancy.credentials import Identity
from inferbus.tenancy.live import RosterServer
from tests.conftest import TEST_MODELS


def add_configs() -> list[inferbus.ModelConfig]:
    return [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "add"]


async def test_user_and_password_in_the_url() -> None:
    auth = "authorization {\n  user: alice\n  password: s3cret\n}\n"
    with inferbus.EmbeddedServer(extra_config=auth) as server:
        url = f"nats://alice:s3cret@{server.host}:{server.port}"
        with pytest.raises(inferbus.ConnectionFailed, match="cannot reach NATS"):
            async with inferbus.connect(server.url):
                pass
        async with (
            inferbus.Worker(add_configs(), ConnectOptions(servers=[url])),
            inferbus.connect(url) as client,
        ):
            result = await client.infer("add", {"x": np.zeros((1, 4), dtype=np.float32)})
    np.testing.assert_array_equal(result["y"], np.full((1, 4), 2.0))


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
            "-out", "ca.pem", "-days", "1", "-subj", "/CN=inferbus test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "server.pem", "-days", "1",
            "-extfile", "san.ext")  # fmt: skip
    return folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certs")
async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls = f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n}}\n'
    with inferbus.EmbeddedServer(extra_config=tls) as server:
        url = f"tls://{server.host}:{server.port}"
        with pytest.raises(inferbus.ConnectionFailed, match="certificate verify failed"):
            async with inferbus.connect(url):
                pass
        options = ConnectOptions(servers=[url], tls_ca=str(ca))
        async with (
            inferbus.Worker(add_configs(), options),
            inferbus.connect(url, tls_ca=str(ca)) as client,
        ):
            result = await client.infer("add", {"x": np.ones((1, 4), dtype=np.float32)})
    np.testing.assert_array_equal(result["y"], np.full((1, 4), 3.0))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certs")
async def test_a_roster_turns_on_tls_and_hands_out_the_private_ca(tmp_path: Path) -> None:
    """``[server]`` tls_cert/tls_key/tls_ca: the server requires TLS, and each connection file
    carries a tls:// URL and the CA, so a worker and a user connect with their file alone."""
    ca, cert, key = make_certificates(tmp_path)
    roster = tmp_path / "roster.toml"
    roster.write_text(
        '[workers.gpu1]\n[users.alice]\nmodels = ["add"]\n[server]\n'
        f'port = {free_port()}\ntls_cert = "{cert.name}"\ntls_key = "{key.name}"\n'
        f'tls_ca = "{ca.name}"\n'  # relative to the roster's folder
    )
    with RosterServer(roster, tmp_path / "state") as running:
        worker_file = running.applied.connection_path(Identity("worker", "gpu1"))
        alice_file = running.applied.connection_path(Identity("user", "alice"))
        alice = ConnectOptions.from_file(alice_file)
        assert alice.servers == [f"tls://127.0.0.1:{running.server.port}"]
        assert alice.tls_ca == str(ca)
        plain = ConnectOptions.from_file(alice_file, tls_ca=None)  # the system's CAs: refused
        with pytest.raises(inferbus.ConnectionFailed, match="certificate verify failed"):
            async with inferbus.Client(plain):
                pass
        async with (
            inferbus.Worker(add_configs(), ConnectOptions.from_file(worker_file), roster=roster),
            inferbus.Client(alice) as client,
        ):
            result = await client.infer("add", {"x": np.ones((1, 4), dtype=np.float32)})
    np.testing.assert_array_equal(result["y"], np.full((1, 4), 3.0))
