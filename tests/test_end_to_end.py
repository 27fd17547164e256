"""Application end to model end through a real nats-server: results equal in-process ones."""

from __future__ import annotations

import numpy as np
import pytest

import inferbus
from inferbus.engines import create_engine
from tests.conftest import TEST_MODELS, RecordingPolicy, worker_options


def in_process(folder: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    engine = create_engine(inferbus.load_model_config(TEST_MODELS / folder))
    engine.load()
    return dict(engine(inputs))


ECHO_INPUTS: dict[str, np.ndarray] = {
    "f32": np.array([[1.5, -2.25, 3e30], [0.0, np.inf, -0.0]], dtype=np.float32),
    "i64": np.array([[2**62, -(2**62)], [0, -1]], dtype=np.int64),
    "flag": np.array([True, False]),
    "text": np.array(["héllo", ""]),
    "u8": np.arange(8, dtype=np.uint8).reshape(2, 2, 2),
}


@pytest.mark.usefixtures("worker")
async def test_remote_equals_in_process_for_every_kind_of_tensor(client: inferbus.Client) -> None:
    remote = await client.infer("echo", ECHO_INPUTS)
    local = in_process("echo", ECHO_INPUTS)
    assert set(remote) == set(local) == {f"{name}_out" for name in ECHO_INPUTS}
    for name, expected in local.items():
        assert remote[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(remote[name], expected)
    assert list(remote["text_out"]) == ["héllo".encode(), b""]
    assert (remote.model_name, remote.model_version) == ("echo", "1")


@pytest.mark.usefixtures("worker")
async def test_single_array_goes_to_the_only_input(client: inferbus.Client) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = await client.infer("add", x, version=1)
    np.testing.assert_array_equal(result.output, x + 1)


@pytest.mark.usefixtures("worker")
async def test_versions_route_by_subject(client: inferbus.Client) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    v1 = await client.infer("add", {"x": x}, version=1)
    v2 = await client.infer("add", {"x": x}, version=2)
    latest = await client.infer("add", {"x": x})
    np.testing.assert_array_equal(v1["y"], x + 1)
    np.testing.assert_array_equal(v2["y"], x + 2)
    assert latest.model_version == "2"
    with pytest.raises(inferbus.ModelNotFound):
        await client.infer("add", {"x": x}, version=3)


@pytest.mark.usefixtures("worker")
async def test_unknown_model_fails_fast(nats_server: inferbus.EmbeddedServer) -> None:
    policy = RecordingPolicy()
    async with inferbus.connect(nats_server.url, retry=policy) as client:
        with pytest.raises(inferbus.ModelNotFound, match=r"no worker serves inferbus\.infer\.nope"):
            await client.infer("nope", {"x": np.zeros(1)}, timeout=5)
    policy.assert_gave_up(inferbus.ModelNotFound)


@pytest.mark.usefixtures("worker")
async def test_requested_outputs_only(client: inferbus.Client) -> None:
    result = await client.infer("echo", ECHO_INPUTS, outputs=["flag_out"])
    assert list(result) == ["flag_out"]


async def test_two_workers_in_one_queue_group_share_the_work(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    configs = [c for c in inferbus.load_repository(TEST_MODELS) if c.name == "add"]
    async with (
        inferbus.Worker(configs, worker_options(nats_server)) as first,
        inferbus.Worker(configs, worker_options(nats_server)) as second,
    ):
        x = np.ones((1, 4), dtype=np.float32)
        for _ in range(60):
            np.testing.assert_array_equal((await client.infer("add", {"x": x}))["y"], x + 2)
        served = [
            sum(e.num_requests for e in w.service.endpoints if e.name == "add")
            for w in (first, second)
        ]
    assert sum(served) == 60
    assert min(served) > 0, f"one worker got nothing: {served}"


@pytest.mark.usefixtures("worker")
async def test_engine_failure_is_a_500_and_the_worker_goes_on(client: inferbus.Client) -> None:
    with pytest.raises(inferbus.EngineFailure, match="engine exploded") as caught:
        await client.infer("failing", {"x": -np.ones((1, 4), dtype=np.float32)})
    assert caught.value.code == 500
    ok = await client.infer("failing", {"x": np.ones((1, 4), dtype=np.float32)})
    np.testing.assert_array_equal(ok["y"], np.ones((1, 4)))


@pytest.mark.usefixtures("worker")
async def test_client_side_checks(client: inferbus.Client) -> None:
    with pytest.raises(inferbus.BadInput, match="must match"):
        await client.infer("bad.name", {"x": np.zeros(1)})
    with pytest.raises(inferbus.BadInput, match="timeout"):
        await client.infer("add", {"x": np.zeros(1)}, timeout=0)


@pytest.mark.usefixtures("worker")
async def test_model_class_runs_pre_and_post_processing(client: inferbus.Client) -> None:
    class PlusOne(inferbus.Model[list[float], list[float]]):
        name = "add"
        version = 1

        def preprocess(self, item: list[float]) -> dict[str, np.ndarray]:
            return {"x": np.array([item], dtype=np.float32)}

        def postprocess(self, outputs: inferbus.InferResult) -> list[float]:
            return [float(v) for v in outputs["y"][0]]

    assert await PlusOne(client)([1, 2, 3, 4]) == [2, 3, 4, 5]


@pytest.mark.usefixtures("worker")
async def test_models_lists_signatures(client: inferbus.Client) -> None:
    models = {(m.name, m.version): m for m in await client.models()}
    assert set(models) >= {("add", 1), ("add", 2), ("echo", 1), ("slow", 1), ("failing", 1)}
    echo = models[("echo", 1)]
    assert [s.datatype for s in echo.signature.inputs] == [
        "FP32",
        "INT64",
        "BOOL",
        "BYTES",
        "UINT8",
    ]
    assert echo.max_batch_size == 8
    assert echo.engine == "onnxruntime"
    assert len(echo.workers) == 1
