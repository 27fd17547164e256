"""The HTTP gateway against a real nats-server and the shared worker: tritonclient's HTTP client
unchanged, plain HTTP (httpx), and the README's curl examples sent as curl sends them."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from nats.aio.msg import Msg
from tritonclient.utils import InferenceServerException

import inferbus
from inferbus.gateway.framing import MAX_JSON_BYTES
from inferbus.natsserver import free_port
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def gateway(
    shared_server: inferbus.EmbeddedServer, shared_worker: inferbus.Worker
) -> Iterator[str]:
    """``inferbus gateway`` as a process of its own in front of the shared worker: its
    host:port. It prints its address once its socket listens; requests wait in the backlog
    until it serves. SIGTERM stops it gracefully (exit status 0)."""
    port = free_port()
    command = [sys.executable, "-m", "inferbus", "gateway", "--servers", shared_server.url,
               "--port", str(port), "--timeout", "10"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line
        yield f"127.0.0.1:{port}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


@pytest.fixture
def triton(gateway: str) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(gateway, network_timeout=30)
    yield client
    client.close()


# --- tritonclient, unchanged --------------------------------------------------------------------


def test_tritonclient_health_and_model_metadata(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("add", "1")
    metadata = triton.get_model_metadata("add", "2")
    assert metadata["name"] == "add"
    assert metadata["versions"] == ["1", "2"]  # every version served, as Triton lists them
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = httpclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    result = triton.infer("add", [tensor], model_version="1", outputs=wanted)
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    assert result.get_response()["model_version"] == "1"


def test_tritonclient_infer_many_datatypes(triton: httpclient.InferenceServerClient) -> None:
    arrays: dict[str, np.ndarray] = {
        "f32": np.array([[1.5, -2, 3]], dtype=np.float32),
        "i64": np.array([[7, -8]], dtype=np.int64),
        "flag": np.array([True]),
        "text": np.array([b"h\xc3\xa9llo"], dtype=object),
        "u8": np.arange(4, dtype=np.uint8).reshape(1, 2, 2),
    }
    datatypes = {"f32": "FP32", "i64": "INT64", "flag": "BOOL", "text": "BYTES", "u8": "UINT8"}
    inputs = []
    for index, (name, array) in enumerate(arrays.items()):
        tensor = httpclient.InferInput(name, list(array.shape), datatypes[name])
        inputs.append(tensor.set_data_from_numpy(array, binary_data=index % 2 == 0))
    result = triton.infer("echo", inputs)  # no outputs named: all of them, as JSON
    for name, array in arrays.items():
        np.testing.assert_array_equal(result.as_numpy(f"{name}_out"), array)


def test_tritonclient_bad_shape_is_400(triton: httpclient.InferenceServerClient) -> None:
    tensor = httpclient.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("add", [tensor], model_version="1")
    assert caught.value.status() == "400"
    assert "must have shape [*, 4], got [1, 3]" in caught.value.message()


def test_tritonclient_timeout_is_504(triton: httpclient.InferenceServerClient) -> None:
    tensor = httpclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:  # slow takes 0.2 s; 20 ms given
        triton.infer("slow", [tensor], timeout=20_000)
    assert caught.value.status() == "504"


def test_tritonclient_unknown_model_is_404(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("nope")
    assert caught.value.status() == "404"


# --- plain HTTP ---------------------------------------------------------------------------------


def _binary_body(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    text = orjson.dumps(header)
    return text + b"".join(tensors), {"Inference-Header-Content-Length": str(len(text))}


def test_binary_body_goes_through_and_comes_back_binary(gateway: str) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    header: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                    "parameters": {"binary_data_size": 16}}],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    body, headers = _binary_body(header, x.tobytes())
    reply = httpx.post(f"http://{gateway}/v2/models/add/versions/2/infer", content=body,
                       headers=headers)  # fmt: skip
    assert reply.status_code == 200, reply.text
    length = int(reply.headers["Inference-Header-Content-Length"])
    answer = orjson.loads(reply.content[:length])
    assert answer["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 4],
                                  "parameters": {"binary_data_size": 16}}]  # fmt: skip
    got = np.frombuffer(reply.content[length:], dtype=np.float32)
    np.testing.assert_array_equal(got, (x + 2).ravel())


def test_large_bodies_use_chunked_transfers(gateway: str) -> None:
    x = (np.arange(3000 * 1024) % 251).astype(np.uint8).reshape(3000, 1024)  # 3 MiB > 1 MiB
    header = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [3000, 1024],
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}  # fmt: skip
    body, headers = _binary_body(header, x.tobytes())
    reply = httpx.post(f"http://{gateway}/v2/models/blob/infer", content=body, headers=headers,
                       timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text
    length = int(reply.headers["Inference-Header-Content-Length"])
    assert reply.content[length:] == x.tobytes()


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/add/infer", b"{not json", 400),
        ("/v2/models/add/versions/x/infer", b'{"inputs": []}', 400),
        ("/v2/models/nope/infer", b'{"inputs": []}', 404),
        ("/v2/models/add/versions/9/infer", b'{"inputs": []}', 404),
        ("/v2/models/add/infer", b'{"inputs": [], "parameters": {"timeout": -1}}', 400),
    ],
)
def test_errors_are_v2_statuses(gateway: str, path: str, body: bytes, status: int) -> None:
    reply = httpx.post(f"http://{gateway}{path}", content=body)
    assert reply.status_code == status
    assert isinstance(reply.json()["error"], str)


def test_unknown_paths_and_methods_get_v2_error_bodies(gateway: str) -> None:
    missing = httpx.get(f"http://{gateway}/v2/models/add/config")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    wrong = httpx.get(f"http://{gateway}/v2/models/add/infer")
    assert wrong.status_code == 405
    assert wrong.json() == {"error": "Method Not Allowed"}


def test_timeout_header_sets_the_budget(gateway: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}
    reply = httpx.post(f"http://{gateway}/v2/models/slow/infer", json=body,
                       headers={"Inferbus-Timeout-Us": "20000"})  # fmt: skip
    assert reply.status_code == 504


def test_health_and_ready(gateway: str) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/ready"):
        assert httpx.get(f"http://{gateway}{path}").status_code == 200
    assert httpx.get(f"http://{gateway}/v2").json()["name"] == "inferbus"


# --- the README's curl examples -----------------------------------------------------------------


def _readme_curls() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## HTTP", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = " ".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in commands.splitlines() if line.strip().startswith("curl")]


def _as_request(command: str, gateway: str) -> httpx.Request:
    """A curl command line (``-s``, ``-X``, ``-H``, ``-d``/``--data-binary @FILE``) as httpx."""
    words = shlex.split(command)
    method, headers, content = "GET", {}, b""
    path = next(word for word in words if word.startswith("localhost:8000"))
    url = "http://" + path.replace("localhost:8000", gateway)
    for flag, value in zip(words, [*words[1:], ""], strict=True):
        if flag == "-H":
            key, _, val = value.partition(":")
            headers[key.strip()] = val.strip()
        elif flag in ("-d", "--data-binary"):
            method = "POST"
            content = Path(value[1:]).read_bytes() if value.startswith("@") else value.encode()
        elif flag == "-X":
            method = value
    return httpx.Request(method, url, headers=headers, content=content)


def test_readme_curl_examples(gateway: str) -> None:
    commands = _readme_curls()
    assert len(commands) >= 2, commands
    with httpx.Client() as client:
        replies = [client.send(_as_request(command, gateway)) for command in commands]
    assert [reply.status_code for reply in replies] == [200] * len(commands), [
        reply.text for reply in replies
    ]
    assert replies[-1].content == _readme_shown_reply()


def _readme_shown_reply() -> bytes:
    section = (ROOT / "README.md").read_text().split("## HTTP", 1)[1]
    shown = section.split("The last prints `", 1)[1].split("`", 1)[0]
    return "".join(shown.split()).encode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl here: the test above covers it")
def test_readme_curl_examples_with_curl(gateway: str) -> None:
    printed = [
        subprocess.run(
            shlex.split(command.replace("localhost:8000", gateway)),
            capture_output=True, check=True, timeout=30,
        ).stdout
        for command in _readme_curls()
    ]  # fmt: skip
    assert printed[0] == b"ready"
    assert orjson.loads(printed[1])["name"] == "add"
    assert printed[-1] == _readme_shown_reply()


def test_inference_header_must_fit_the_body(gateway: str) -> None:
    """A valid header whose declared length runs one byte past the body."""
    x = np.zeros((1, 4), dtype=np.float32)
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                          "parameters": {"binary_data_size": 16}}]}  # fmt: skip
    body, headers = _binary_body(header, x.tobytes())
    fits = httpx.post(f"http://{gateway}/v2/models/add/infer", content=body, headers=headers)
    assert fits.status_code == 200, fits.text
    past = str(int(headers["Inference-Header-Content-Length"]) + len(body))
    reply = httpx.post(f"http://{gateway}/v2/models/add/infer", content=body,
                       headers={"Inference-Header-Content-Length": past})  # fmt: skip
    assert reply.status_code == 400
    assert "runs past the end" in reply.json()["error"]


@pytest.mark.parametrize(
    ("datatype", "data", "why"),
    [
        ("BYTES", [100_000_000], "type str"),  # bytes(n) would allocate n bytes
        ("BOOL", ["false"], "type bool"),
        ("INT32", [1.9], "type int"),
        ("FP32", [None], "type int or float"),
        ("FP32", [True], "type int or float"),
    ],
)
def test_json_data_is_never_coerced(gateway: str, datatype: str, data: list[Any], why: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": data}]}
    reply = httpx.post(f"http://{gateway}/v2/models/echo/infer", json=body)
    assert reply.status_code == 400
    assert why in reply.json()["error"]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v2/models/add/infer", {"Inferbus-Timeout-Us": "9" * 5000}),
        ("/v2/models/add/infer", {"Inference-Header-Content-Length": "9" * 5000}),
        ("/v2/models/add/infer", {"Inferbus-Timeout-Us": "1" + "0" * 30}),
        ("/v2/models/add/versions/" + "9" * 5000 + "/infer", {}),
    ],
)
def test_huge_numbers_are_400_not_500(gateway: str, path: str, headers: dict[str, str]) -> None:
    reply = httpx.post(f"http://{gateway}{path}", content=b'{"inputs": []}', headers=headers)
    assert reply.status_code == 400, reply.text
    assert "integer" in reply.json()["error"]


def test_large_json_headers_are_refused(gateway: str) -> None:
    """Tensors that large belong in binary data: 413 before the JSON is parsed."""
    body = b'{"inputs": []}' + b" " * MAX_JSON_BYTES
    reply = httpx.post(f"http://{gateway}/v2/models/add/infer", content=body, timeout=60)
    assert reply.status_code == 413
    assert "binary data" in reply.json()["error"]


async def test_a_malformed_worker_reply_is_500_not_the_callers_fault(
    gateway: str, shared_server: inferbus.EmbeddedServer
) -> None:
    fake = await nats.connect(shared_server.url)
    try:

        async def junk(msg: Msg) -> None:
            await msg.respond(b"\x05\x00\x00\x00{bad!")

        await fake.subscribe("inferbus.infer.junk", queue="inferbus.infer.junk", cb=junk)
        await fake.flush()
        async with httpx.AsyncClient(timeout=30) as http:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
            reply = await http.post(f"http://{gateway}/v2/models/junk/infer", json=body)
        assert reply.status_code == 500
        assert "malformed reply" in reply.json()["error"]
    finally:
        await fake.close()


def test_the_http_stack_loads_only_for_the_gateway() -> None:
    """``import inferbus`` and the CLI's parser never import Starlette, uvicorn or the
    gateway package (it loads when ``inferbus gateway`` runs)."""
    code = (
        "import sys, inferbus, inferbus.cli; inferbus.cli.build_parser(); "
        "stack = ('starlette', 'uvicorn', 'inferbus.gateway'); "
        "print(sorted(m for m in stack if m in sys.modules))"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=60)  # fmt: skip
    assert shown.stdout.strip() == "[]"


def test_the_dashboard_is_at_the_root(gateway: str) -> None:
    """The page, with the cluster's first frame in it (tests/test_dashboard.py drives it in
    a browser), and its live feed beside the V2 routes."""
    page = httpx.get(f"http://{gateway}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<h1>inferbus</h1>" in page.text
    assert '"name":"add"' in page.text  # the first frame: the shared worker's models
    with httpx.stream("GET", f"http://{gateway}/dashboard/events", timeout=10) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in events.iter_lines() if line.startswith("data: "))
    assert '"workers"' in first
