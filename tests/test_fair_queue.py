"""The fair scheduler of shared buses: per-user lanes, deficit round-robin by rows, and a full
queue that pushes out the heaviest user's newest request."""

from __future__ import annotations

import asyncio

import pytest

import inferbus
from inferbus.pipeline.fair import FairBatchQueue

KEY = ("x", (4,))


def queue(max_batch: int = 8, size: int = 100) -> FairBatchQueue[str]:
    return FairBatchQueue(max_batch_size=max_batch, max_queue_size=size)


def batch_of(fair: FairBatchQueue[str]) -> list[str]:
    return [item.payload for item in asyncio.run(fair.next_batch())]


def test_a_flood_does_not_keep_one_request_waiting() -> None:
    fair = queue(max_batch=8)
    for index in range(50):
        fair.submit(f"a{index}", rows=1, key=KEY, lane="alice")
    fair.submit("b0", rows=1, key=KEY, lane="bob")
    first = batch_of(fair)
    assert "b0" in first  # bob's one request rides in the first batch ...
    assert len(first) == 8  # ... which alice's requests fill up
    assert first[:4] == ["a0", "a1", "a2", "a3"]  # alice first: her request opened the batch


def test_rows_are_shared_in_turn_between_waiting_users() -> None:
    fair = queue(max_batch=8)
    for index in range(20):
        fair.submit(f"a{index}", rows=1, key=KEY, lane="alice")
        fair.submit(f"b{index}", rows=1, key=KEY, lane="bob")
    for _ in range(3):
        taken = batch_of(fair)
        assert sum(name.startswith("a") for name in taken) == 4
        assert sum(name.startswith("b") for name in taken) == 4


def test_the_opener_goes_last_next_time() -> None:
    fair = queue(max_batch=2)
    for index in range(4):
        fair.submit(f"a{index}", rows=2, key=KEY, lane="alice")
        fair.submit(f"b{index}", rows=2, key=KEY, lane="bob")
    assert [batch_of(fair) for _ in range(4)] == [["a0"], ["b0"], ["a1"], ["b1"]]


def test_large_requests_wait_for_credit_but_are_never_stuck() -> None:
    fair = queue(max_batch=8)
    fair.submit("big", rows=8, key=KEY, lane="alice")
    for index in range(3):
        fair.submit(f"b{index}", rows=1, key=KEY, lane="bob")
    assert batch_of(fair) == ["big"]
    assert batch_of(fair) == ["b0", "b1", "b2"]
    assert len(fair) == 0


def test_only_compatible_requests_share_a_batch_and_lanes_keep_their_order() -> None:
    fair = queue(max_batch=8)
    fair.submit("a0", rows=1, key=KEY, lane="alice")
    fair.submit("c0", rows=1, key=KEY, lane="carol")
    fair.submit("b0", rows=1, key=("x", (5,)), lane="bob")
    fair.submit("b1", rows=1, key=KEY, lane="bob")
    assert batch_of(fair) == ["a0", "c0"]  # bob's head does not fit this batch: b1 waits too
    assert batch_of(fair) == ["b0"]
    assert batch_of(fair) == ["b1"]


def test_a_full_queue_pushes_out_the_floods_newest_request() -> None:
    fair = queue(size=4)
    for index in range(4):
        assert fair.submit(f"a{index}", rows=1, key=KEY, lane="alice") is None
    with pytest.raises(inferbus.Overloaded, match="the most of them yours"):
        fair.submit("a4", rows=1, key=KEY, lane="alice")
    pushed = fair.submit("b0", rows=1, key=KEY, lane="bob")
    assert pushed is not None
    assert (pushed.payload, pushed.lane) == ("a3", "alice")
    assert len(fair) == 4
    assert fair.waiting("bob") == 1
    assert sorted(item.payload for item in fair.take_all()) == ["a0", "a1", "a2", "b0"]
    assert len(fair) == 0


def test_an_empty_queue_waits_for_work() -> None:
    async def scenario() -> list[str]:
        fair = queue()
        waiting = asyncio.create_task(fair.next_batch())
        await asyncio.sleep(0)
        assert not waiting.done()
        fair.submit("a0", rows=1, key=KEY, lane="alice")
        return [item.payload for item in await waiting]

    assert asyncio.run(scenario()) == ["a0"]
