"""Fixtures: real nats-server processes, workers and clients.

How they are shared
-------------------
* ``worker`` is one worker for the whole session, serving tests/models and examples/models
  on one nats-server for the whole session. It runs on its own event loop in a daemon
  thread, so it answers whatever loop a test runs on, and tests that are not async at all
  (the CLI, the README snippets) too. Tests that ask for it may only send it requests: its
  counters and state belong to everyone, so a test must not assert on them.
* ``own_worker`` is a fresh worker serving tests/models, on a fresh nats-server, for tests
  that read a worker's counters, $SRV.STATS or metrics, count the workers, or otherwise
  depend on being the only worker there.
* ``nats_server`` is the shared server when the test uses ``worker``; otherwise it is a
  server of the test's own (one starts in ~30 ms). A test that does not ask for the shared
  worker usually starts, stops or kills workers of its own and counts on them being the
  only ones, so it must not meet the shared worker. Special servers (max_payload, auth,
  TLS, clusters) are made by the tests that need them.
* ``client`` and ``raw_nats`` are connections of the test's own to ``nats_server``.

Event loops: every async test and fixture runs on pytest-asyncio's function-scoped loop
(asyncio_mode=auto, asyncio_default_fixture_loop_scope=function); no fixture needs a wider
loop scope, because the only long-lived async object, the shared worker, has its own loop.

The server's log: at teardown ``nats_server`` prints what the server logged during the test
(all of it for a server of the test's own); pytest shows it only for tests that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

import inferbus
from inferbus.errors import RequestError
from inferbus.pipeline.connection import ConnectOptions
from inferbus.pipeline.discovery import gather

ROOT = Path(__file__).resolve().parent.parent
TEST_MODELS = ROOT / "tests" / "models"
EXAMPLE_MODELS = ROOT / "examples" / "models"


def worker_options(server: inferbus.EmbeddedServer) -> ConnectOptions:
    return ConnectOptions(servers=[server.url], name="test-worker")


class ThreadedWorker:
    """A ``Worker`` on an event loop of its own, in a daemon thread, while ``with`` lasts."""

    def __init__(self, configs: list[inferbus.ModelConfig], options: ConnectOptions) -> None:
        self._configs = configs
        self._options = options
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._worker: inferbus.Worker | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shared-worker", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __enter__ or __exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with inferbus.Worker(self._configs, self._options) as worker:
            self._worker = worker
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> inferbus.Worker:
        self._thread.start()
        if not self._ready.wait(60):
            raise AssertionError("the shared worker did not start within 60 s")
        if self._error is not None or self._worker is None:
            raise AssertionError("the shared worker failed to start") from self._error
        return self._worker

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the shared worker did not stop within 30 s"
        if self._error is not None:
            raise AssertionError("the shared worker failed") from self._error


@pytest.fixture(scope="session")
def shared_server() -> Iterator[inferbus.EmbeddedServer]:
    with inferbus.EmbeddedServer() as server:
        yield server


@pytest.fixture(scope="session")
def shared_worker(shared_server: inferbus.EmbeddedServer) -> Iterator[inferbus.Worker]:
    configs = [*inferbus.load_repository(TEST_MODELS), *inferbus.load_repository(EXAMPLE_MODELS)]
    with ThreadedWorker(configs, worker_options(shared_server)) as running:
        yield running


@pytest.fixture
def nats_server(request: pytest.FixtureRequest) -> Iterator[inferbus.EmbeddedServer]:
    """The shared server for tests that use the shared ``worker``; else one of the test's own."""
    names = request.fixturenames
    if "worker" in names and "own_worker" in names:
        raise pytest.UsageError("a test uses either the shared `worker` or `own_worker`")
    if "worker" in names:
        shared: inferbus.EmbeddedServer = request.getfixturevalue("shared_server")
        logged = len(shared.log_text())
        yield shared
        print(f"--- nats-server log ({shared.url}), during this test ---")
        print(shared.log_text()[logged:])
        return
    with inferbus.EmbeddedServer() as server:
        yield server
        # pytest shows this only when the test failed: the server's view of what happened.
        print(f"--- nats-server log ({server.url}) ---\n{server.log_text()}")


@pytest.fixture
def worker(nats_server: inferbus.EmbeddedServer, shared_worker: inferbus.Worker) -> inferbus.Worker:
    """The session's worker: send it requests, never assert on its counters or state."""
    return shared_worker


@pytest.fixture
async def own_worker(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[inferbus.Worker]:
    """A worker of the test's own, serving tests/models on a server of the test's own."""
    configs = inferbus.load_repository(TEST_MODELS)
    async with inferbus.Worker(configs, worker_options(nats_server)) as running:
        yield running


@pytest.fixture
async def client(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[inferbus.Client]:
    async with inferbus.connect(nats_server.url) as connected:
        yield connected


@pytest.fixture
async def raw_nats(nats_server: inferbus.EmbeddedServer) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection, for sending bytes no inferbus client would send."""
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.close()


@dataclass(frozen=True)
class RecordingPolicy(inferbus.RetryPolicy):
    """The default retry policy, noting each decision it makes: (error class, retried?)."""

    decisions: list[tuple[type[Exception], bool]] = field(default_factory=list)

    def should_retry(self, error: RequestError, attempt: int, elapsed: float) -> bool:
        retried = super().should_retry(error, attempt, elapsed)
        self.decisions.append((type(error), retried))
        return retried

    def assert_gave_up(self, error: type[RequestError]) -> None:
        """Every failed attempt was ``error``, and the client stopped because this policy
        refused another try: not because the caller's budget ran out (then the client raises
        without asking the policy) and not on an attempt that waited for its time limit."""
        assert self.decisions, "no attempt failed"
        assert {kind for kind, _ in self.decisions} == {error}, self.decisions
        assert self.decisions[-1][1] is False, self.decisions


async def eventually(condition: Callable[[], bool], what: str, *, tries: int = 300) -> None:
    """Until ``condition()`` holds, looking every 20 ms, at most ``tries`` times."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def wait_for_workers(client: inferbus.Client, model: str, count: int) -> None:
    """Until ``count`` workers announce ``model`` (a worker subscribes before it announces)."""
    for _ in range(200):
        found = [m for m in await client.models(timeout=0.1) if m.name == model]
        if found and min(len(m.workers) for m in found) >= count:
            return
    raise AssertionError(f"{count} workers never served {model}")


async def requests_by_pid(client: inferbus.Client, endpoint: str, workers: int) -> dict[int, int]:
    """Requests each worker process has received on ``endpoint``, from their $SRV.STATS."""
    replies = await gather(client.nats, "$SRV.STATS.inferbus", timeout=5, count=workers)
    counts = {}
    for reply in replies:
        (stats,) = [e for e in reply["endpoints"] if e["name"] == endpoint]
        counts[int(reply["metadata"]["pid"])] = int(stats["num_requests"])
    assert len(counts) == workers, f"{workers} workers expected, {len(counts)} answered"
    return counts


@dataclass(frozen=True, slots=True)
class Load:
    """What ``add_under_load`` saw: every result, in no particular order, and how many
    requests were completed before the disruption began and sent after it ended."""

    results: list[inferbus.InferResult]
    done_before: int
    sent_after: int


async def add_under_load(
    client: inferbus.Client,
    disrupt: Callable[[], Awaitable[Any]],
    *,
    tasks: int,
    calls: int,
    timeout: float,
) -> Load:
    """``tasks`` callers each send ``calls`` requests to add v1, one after the other; once a
    quarter of them are answered, ``disrupt`` runs while the rest keep coming."""
    x = {"x": np.ones((1, 4), dtype=np.float32)}
    quarter = asyncio.Event()
    done = 0
    disrupted = False
    sent_after = 0

    async def steady() -> list[inferbus.InferResult]:
        nonlocal done, sent_after
        results = []
        for _ in range(calls):
            sent_after += disrupted
            results.append(await client.infer("add", x, version=1, timeout=timeout))
            done += 1
            if done * 4 >= tasks * calls:
                quarter.set()
        return results

    load = [asyncio.create_task(steady()) for _ in range(tasks)]
    waiting = asyncio.create_task(quarter.wait())
    await asyncio.wait([waiting, *load], return_when=asyncio.FIRST_COMPLETED)
    if not quarter.is_set():  # a caller failed first: that is the error to see
        waiting.cancel()
        await asyncio.gather(*load)
    done_before = done
    await disrupt()
    disrupted = True
    results = [result for batch in await asyncio.gather(*load) for result in batch]
    return Load(results, done_before, sent_after)
