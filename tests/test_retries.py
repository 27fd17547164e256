"""Client retries: within the caller's budget, never beyond it, counted in the result."""

from __future__ import annotations

import asyncio
import dataclasses
import signal

import numpy as np
import pytest

import inferbus
from inferbus.errors import (
    DeadlineExceeded,
    EngineFailure,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from tests.conftest import (
    Load,
    RecordingPolicy,
    add_under_load,
    requests_by_pid,
    wait_for_workers,
)
from tests.test_worker_lifecycle import start_worker_process


def test_policy_decides_what_to_retry() -> None:
    policy = inferbus.RetryPolicy(max_attempts=3, not_found_grace_s=0.25)
    assert policy.should_retry(Overloaded("full"), 1, 0.0)
    assert policy.should_retry(Overloaded("full"), 3, 0.0)  # 429: while the budget lasts
    assert policy.should_retry(DeadlineExceeded("no reply", silent=True), 2, 0.0)
    assert policy.should_retry(DeadlineExceeded("no reply", silent=True), 3, 0.0)  # likewise
    assert not policy.should_retry(DeadlineExceeded("the worker's own 504"), 1, 0.0)
    assert policy.should_retry(Unavailable("draining"), 2, 0.0)
    assert not policy.should_retry(Unavailable("draining"), 3, 0.0)  # attempts used up
    assert policy.should_retry(ModelNotFound("restarting?"), 1, 0.1)
    assert not policy.should_retry(ModelNotFound("nobody"), 1, 0.3)  # past the grace
    assert not policy.should_retry(ModelNotFound("restarting?"), 3, 0.1)  # attempts used up
    assert not policy.should_retry(EngineFailure("bug"), 1, 0.0)  # not transient
    assert all(0 <= policy.delay(n) <= policy.max_backoff_s for n in range(1, 20))
    assert policy.attempt_timeout(4.0, None) == 4.0  # no history yet: the whole budget
    assert policy.attempt_timeout(4.0, 0.01) == 1.0  # a fast model: min_attempt_s
    assert policy.attempt_timeout(4.0, 0.5) == pytest.approx(2.05)  # a slow one: 4x its time
    assert policy.attempt_timeout(1.5, 0.9) == 1.5  # never past the budget


async def test_a_full_queue_is_retried_and_the_attempts_counted(
    worker: inferbus.Worker, nats_server: inferbus.EmbeddedServer
) -> None:
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    # slow frees 8 places every 0.2 s: backoff long enough that a retry can find one.
    patient = inferbus.RetryPolicy(max_attempts=10, backoff_s=0.1)
    async with inferbus.connect(nats_server.url, retry=patient) as client:
        results = await asyncio.gather(
            *(client.infer("slow", x, timeout=20) for _ in range(60)), return_exceptions=True
        )
    served = [r for r in results if isinstance(r, inferbus.InferResult)]
    assert any(r.attempts > 1 for r in served), "nothing needed a retry"
    assert all(isinstance(r, inferbus.InferResult | Overloaded) for r in results)


@pytest.mark.usefixtures("worker")
async def test_unknown_models_still_fail_fast(nats_server: inferbus.EmbeddedServer) -> None:
    policy = RecordingPolicy()
    async with inferbus.connect(nats_server.url, retry=policy) as client:
        with pytest.raises(ModelNotFound):
            await client.infer("nope", {"x": np.zeros(1)}, timeout=10)
    policy.assert_gave_up(ModelNotFound)


@dataclasses.dataclass
class StoppedOne:
    """Two ``add`` workers under load, the first sent ``sig`` once a quarter was answered."""

    load: Load
    first: int  # pids
    second: int
    before: dict[int, int]  # requests each had served when the signal went
    after: dict[int, int]  # requests served, by the workers still there afterwards
    exit_code: int  # the first worker's


async def stop_one_of_two(
    server: inferbus.EmbeddedServer, client: inferbus.Client, sig: signal.Signals
) -> StoppedOne:
    first = start_worker_process(server.url, "add")
    second = start_worker_process(server.url, "add")
    try:
        await wait_for_workers(client, "add", 2)
        before: dict[int, int] = {}

        async def disrupt() -> None:
            before.update(await requests_by_pid(client, "add_v1", 2))
            first.send_signal(sig)

        load = await add_under_load(client, disrupt, tasks=8, calls=60, timeout=3)
        exit_code = await asyncio.to_thread(first.wait, 20)
        after = await requests_by_pid(client, "add_v1", 1)
    finally:
        for process in (first, second):
            process.kill()
            process.communicate()
    return StoppedOne(load, first.pid, second.pid, before, after, exit_code)


async def test_a_worker_killed_under_load_loses_no_request(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    """Two workers; SIGKILL one while requests flow: every request succeeds in its budget."""
    run = await stop_one_of_two(nats_server, client, signal.SIGKILL)
    load, before, after = run.load, run.before, run.after
    assert len(load.results) == 480
    assert all(np.array_equal(r["y"], np.full((1, 4), 2.0)) for r in load.results)
    # Both served before the kill; the killed one died of it (and so served nothing after).
    assert before[run.first] > 0
    assert before[run.second] > 0
    assert run.exit_code == -signal.SIGKILL
    # Every request sent after the kill was answered, and only the survivor was left to.
    assert load.sent_after > 0
    assert set(after) == {run.second}
    assert after[run.second] - before[run.second] >= load.sent_after


async def test_a_slow_model_is_not_cut_short(
    worker: inferbus.Worker, client: inferbus.Client
) -> None:
    """slow takes 0.2 s: a 0.35 s budget is enough, retries or not."""
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    for _ in range(3):
        result = await client.infer("slow", x, timeout=0.35)
        assert result.attempts == 1


async def test_sigterm_under_load_fails_nothing(
    nats_server: inferbus.EmbeddedServer, client: inferbus.Client
) -> None:
    """A worker drained with SIGTERM while requests flow: zero failed requests."""
    run = await stop_one_of_two(nats_server, client, signal.SIGTERM)
    load, before, after = run.load, run.before, run.after
    assert len(load.results) == 480
    assert all(np.array_equal(r["y"], np.full((1, 4), 2.0)) for r in load.results)
    # Both served before the SIGTERM; the drained one then exited cleanly...
    assert before[run.first] > 0
    assert before[run.second] > 0
    assert run.exit_code == 0
    # ...and the survivor took the requests that kept coming.
    assert load.sent_after > 0
    assert set(after) == {run.second}
    assert after[run.second] > before[run.second]
