"""The synchronous door (``inferbus.sync``) against the shared worker, from plain functions:
the async client's answers, errors, ``map`` and ``Model`` — without ``await``."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

import inferbus
from inferbus import sync
from inferbus.example.digits_app import DigitsClassifier

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture
def client(
    shared_server: inferbus.EmbeddedServer, shared_worker: inferbus.Worker
) -> Iterator[sync.SyncClient]:
    with sync.connect(shared_server.url) as connected:
        yield connected


def test_infer_blocks_and_answers_like_the_async_client(client: sync.SyncClient) -> None:
    result = client.infer("add", {"x": X}, version=1)
    np.testing.assert_array_equal(result["y"], X + 1)
    assert client.describe("add", 2).version == 2
    assert {m.name for m in client.models()} >= {"add", "digits"}


def test_errors_are_the_async_clients_own(client: sync.SyncClient) -> None:
    with pytest.raises(inferbus.ModelNotFound):
        client.infer("nope", {"x": X}, timeout=2)
    with pytest.raises(inferbus.BadInput):
        client.infer("add", {"x": np.zeros((1, 5), np.float32)})
    np.testing.assert_array_equal(client.infer("add", {"x": X}, version=1)["y"], X + 1)


def test_map_is_a_plain_iterator_in_input_order(client: sync.SyncClient) -> None:
    items = [{"x": np.full((1, 4), i, np.float32)} for i in range(50)]
    got = [r["y"][0, 0] for r in client.map("add", items, version=1, pack=8, progress=False)]
    assert got == [i + 1.0 for i in range(50)]
    failures = list(client.map("add", [{"x": X}, {"x": np.zeros((1, 5), np.float32)}],
                               errors="return", progress=False))  # fmt: skip
    assert isinstance(failures[1], inferbus.BadInput)


def test_leaving_a_map_early_closes_it(client: sync.SyncClient) -> None:
    items = ({"x": np.full((1, 4), i, np.float32)} for i in range(10_000))
    for count, _ in enumerate(client.map("add", items, version=1, progress=False), 1):
        if count == 5:
            break
    assert client.infer("add", {"x": X}, version=1)["y"][0, 0] == 1.0  # still serving


def test_a_model_subclass_without_await(client: sync.SyncClient) -> None:
    with np.load(inferbus.example.DATA) as held_out:
        images, labels = held_out["images"][:64], held_out["labels"][:64]
    digits = client.model(DigitsClassifier, timeout=10)
    one = digits(images[:1])
    assert one.shape == (1,)
    answers = np.concatenate(list(digits.map(np.split(images, 16), pack=4, progress=False)))
    assert answers[0] == one[0]
    assert (answers == labels).mean() >= 0.9


def test_calls_from_many_threads_share_one_loop(client: sync.SyncClient) -> None:
    results: dict[int, float] = {}

    def call(i: int) -> None:
        results[i] = float(client.infer("add", {"x": np.full((1, 4), i, np.float32)},
                                        version=1)["y"][0, 0])  # fmt: skip

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {i: i + 1.0 for i in range(8)}


def test_close_stops_the_background_thread(shared_server: inferbus.EmbeddedServer) -> None:
    before = {t.name for t in threading.enumerate()}
    client = sync.connect(shared_server.url)
    client.start()
    assert "inferbus-sync-loop" in {t.name for t in threading.enumerate()}
    client.close()
    client.close()  # twice is fine
    assert {t.name for t in threading.enumerate()} == before
    with pytest.raises(inferbus.Unavailable, match="closed"):
        client.infer("add", {"x": X})
