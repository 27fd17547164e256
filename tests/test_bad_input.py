"""Every malformed request gets a coded error reply, and the worker keeps serving."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from nats.aio.client import Client as NatsClient

import inferbus
from inferbus.codecs import InferRequest, encode_request

GOOD = encode_request(InferRequest("good", {"x": np.ones((1, 4), dtype=np.float32)}))


def frame(header: object, data: bytes = b"") -> bytes:
    json = orjson.dumps(header)
    return struct.pack("<I", len(json)) + json + data


def x_header(datatype: str = "FP32", shape: list[int] | None = None, size: int = 16) -> object:
    entry = {
        "name": "x",
        "datatype": datatype,
        "shape": shape or [1, 4],
        "parameters": {"binary_data_size": size},
    }
    return {"id": "bad", "inputs": [entry]}


BAD_REQUESTS = {
    "wrong datatype": (frame(x_header("INT32"), bytes(16)), 400, "must be FP32"),
    "wrong rank": (frame(x_header(shape=[4]), bytes(16)), 400, "must have shape"),
    "wrong shape": (frame(x_header(shape=[2, 2]), bytes(16)), 400, "must have shape"),
    "wrong input name": (
        frame(
            {
                "inputs": [
                    {
                        "name": "z",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "parameters": {"binary_data_size": 16},
                    }
                ]
            },
            bytes(16),
        ),
        400,
        "missing",
    ),
    "truncated body": (GOOD[:-5], 400, "declare"),
    "garbage bytes": (b"\x89PNG\r\n\x1a\n not a request at all", 400, "length"),
    "declared size past the body": (frame(x_header(size=1 << 30), bytes(16)), 400, "declare"),
    "json header not json": (struct.pack("<I", 9) + b"{not json", 400, "not valid JSON"),
    "empty body": (b"", 400, "shorter"),
    "unknown datatype": (frame(x_header("FP8"), bytes(16)), 400, "unknown datatype"),
    "batch over max_batch_size": (
        frame(x_header(shape=[9, 4], size=144), bytes(144)),
        413,
        "max_batch_size",
    ),
    "expired budget": (
        frame({**x_header(), "parameters": {"timeout": 0}}, bytes(16)),  # type: ignore[dict-item]
        504,
        "time budget",
    ),
}


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_request_gets_coded_error_and_worker_goes_on(
    case: str, raw_nats: NatsClient
) -> None:
    body, code, message = BAD_REQUESTS[case]
    reply = await raw_nats.request("inferbus.infer.add.1", body, timeout=5)
    assert reply.headers is not None, f"{case}: success reply for a bad request"
    assert reply.headers["Nats-Service-Error-Code"] == str(code)
    assert message in reply.headers["Nats-Service-Error"]
    assert message in inferbus.codecs.decode_error(reply.data)
    good = await raw_nats.request("inferbus.infer.add.1", GOOD, timeout=5)
    assert not good.headers
    assert inferbus.codecs.decode_response(good.data).outputs["y"].tolist() == [[2.0] * 4]


@pytest.mark.usefixtures("worker")
async def test_error_codes_become_exception_classes(client: inferbus.Client) -> None:
    with pytest.raises(inferbus.BadInput) as caught:
        await client.infer("add", {"x": np.ones((1, 4), dtype=np.float64)})
    assert caught.value.code == 400
    assert isinstance(caught.value, ValueError)
    with pytest.raises(inferbus.PayloadTooLarge):
        await client.infer("add", {"x": np.ones((9, 4), dtype=np.float32)})
    with pytest.raises(inferbus.BadInput, match="unknown outputs"):
        await client.infer("add", {"x": np.ones((1, 4), dtype=np.float32)}, outputs=["nope"])


@pytest.mark.usefixtures("worker")
async def test_unknown_model_over_raw_nats_has_no_responders(raw_nats: NatsClient) -> None:
    import nats.errors

    with pytest.raises(nats.errors.NoRespondersError):
        await raw_nats.request("inferbus.infer.unknown", GOOD, timeout=5)
    assert (await raw_nats.request("inferbus.infer.add", GOOD, timeout=5)).headers is None
