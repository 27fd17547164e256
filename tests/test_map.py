"""``Client.map``: order kept, packing, bounded concurrency, progress and the error policy."""

from __future__ import annotations

import numpy as np
import pytest

import inferbus
from inferbus.pipeline.mapping import pack_items, slices, unpack


def items(n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.full((1, 4), i, dtype=np.float32)} for i in range(n)]


def test_pack_groups_compatible_items_within_limits() -> None:
    mixed = [*items(5), {"x": np.zeros((3, 2), dtype=np.float32)}, *items(2)]
    chunks = list(pack_items(mixed, 2, 8))
    assert [c.first for c in chunks] == [0, 2, 4, 5, 6]
    assert [c.rows for c in chunks] == [(1, 1), (1, 1), (1,), (3,), (1, 1)]
    np.testing.assert_array_equal(chunks[0].inputs["x"][:, 0], [0, 1])
    capped = list(pack_items(items(5), 10, 2))
    assert [c.rows for c in capped] == [(1, 1), (1, 1), (1,)]


def test_unpack_splits_rows_and_refuses_mismatches() -> None:
    parts = unpack({"y": np.arange(6).reshape(3, 2)}, [1, 2])
    assert [p["y"].tolist() for p in parts] == [[[0, 1]], [[2, 3], [4, 5]]]
    with pytest.raises(inferbus.EngineFailure, match="not 4 rows"):
        unpack({"y": np.arange(6).reshape(3, 2)}, [2, 2])


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("samples_per_request", [1, 3, 8])
async def test_map_keeps_order(client: inferbus.Client, samples_per_request: int) -> None:
    results = [
        result
        async for result in client.map(
            "add", items(50), version=1, pack=samples_per_request, concurrency=4
        )
    ]
    assert len(results) == 50
    for i, result in enumerate(results):
        assert isinstance(result, inferbus.InferResult)
        np.testing.assert_array_equal(result["y"], np.full((1, 4), i + 1))


@pytest.mark.usefixtures("worker")
async def test_map_accepts_bare_arrays_and_generators(client: inferbus.Client) -> None:
    generator = (np.full((1, 4), i, dtype=np.float32) for i in range(10))
    results = [r async for r in client.map("add", generator, version=2, pack=4)]
    assert [int(r.output[0, 0]) for r in results] == [i + 2 for i in range(10)]


@pytest.mark.usefixtures("worker")
async def test_map_reports_progress(
    client: inferbus.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    results = [r async for r in client.map("add", items(30), pack=5, progress=True)]
    assert len(results) == 30
    err = capsys.readouterr().err
    assert "add" in err
    assert "30/30" in err


@pytest.mark.usefixtures("worker")
async def test_map_errors_raise_or_stay_in_place(client: inferbus.Client) -> None:
    values = [1.0, -1.0, 2.0]
    inputs = [{"x": np.full((1, 4), v, dtype=np.float32)} for v in values]
    with pytest.raises(inferbus.EngineFailure):
        _ = [r async for r in client.map("failing", inputs)]
    returned = [r async for r in client.map("failing", inputs, errors="return")]
    assert isinstance(returned[0], inferbus.InferResult)
    assert isinstance(returned[1], inferbus.EngineFailure)
    assert isinstance(returned[2], inferbus.InferResult)


@pytest.mark.usefixtures("worker")
async def test_map_refuses_bad_settings_and_unknown_models(client: inferbus.Client) -> None:
    with pytest.raises(inferbus.BadInput):
        _ = [r async for r in client.map("add", items(2), concurrency=0)]
    with pytest.raises(inferbus.ModelNotFound):
        _ = [r async for r in client.map("nope", items(2), pack=2)]


@pytest.mark.usefixtures("worker")
async def test_map_splits_an_array_into_one_row_items(client: inferbus.Client) -> None:
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    results = [r async for r in client.map("add", rows, version=1, pack=4)]
    assert len(results) == 10
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], rows[i : i + 1] + 1)
    named = [r async for r in client.map("add", {"x": rows}, version=2, pack=3)]
    assert [int(r["y"][0, 0]) for r in named] == [4 * i + 2 for i in range(10)]


def test_slices_are_views_of_one_row_items() -> None:
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunks = list(slices({"x": rows}, 2))
    assert [c.rows for c in chunks] == [(1, 1), (1, 1), (1,)]
    assert [c.first for c in chunks] == [0, 2, 4]
    assert np.shares_memory(chunks[0].inputs["x"], rows)
