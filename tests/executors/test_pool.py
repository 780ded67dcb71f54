"""The local pool on its own: results, failures, deaths and resets, one worker at a time."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor, Future

import pytest

from imgserver.executors.pool import LocalPool

from conftest import wait_for
from processes import alive


def double(x: int) -> int:
    """A task that answers."""
    return x * 2


def fail(message: str) -> None:
    """A task that raises."""
    raise ValueError(message)


def die(code: int) -> None:
    """A task whose worker process dies, as in a codec's segfault."""
    os._exit(code)


def sleep_then_pid(seconds: float) -> int:
    """A task that runs a while, then names its worker."""
    time.sleep(seconds)
    return os.getpid()


@pytest.fixture
def pool() -> Iterator[LocalPool]:
    pool = LocalPool(2, max_pixels=10**8)
    yield pool
    pool.shutdown()


def test_pool_returns_results_and_raises_the_tasks_exceptions(pool: LocalPool) -> None:
    assert [pool.submit(double, i).result(30) for i in range(5)] == [0, 2, 4, 6, 8]
    failed = pool.submit(fail, "bad field")
    with pytest.raises(ValueError, match="bad field") as raised:
        failed.result(30)
    assert "fail" in str(raised.value.__cause__)  # the worker's traceback rides along


def test_pool_worker_death_fails_its_task_alone(pool: LocalPool) -> None:
    slow = pool.submit(sleep_then_pid, 1.0)
    dead = pool.submit(die, 7)
    with pytest.raises(BrokenExecutor, match="exit code 7"):
        dead.result(30)
    assert alive(slow.result(30))  # the other worker finished its task and lives on
    assert pool.submit(double, 21).result(30) == 42  # and the pool replaced the dead one


def test_pool_reset_stops_only_the_named_tasks_workers(pool: LocalPool) -> None:
    long = pool.submit(sleep_then_pid, 30.0)
    short = pool.submit(sleep_then_pid, 0.5)
    time.sleep(0.2)  # both running: a worker each
    assert pool.reset([long]) == 1  # the workers it stopped
    with pytest.raises(BrokenExecutor):
        long.result(10)
    assert alive(short.result(30))


def test_pool_task_that_cannot_be_pickled_fails_alone(pool: LocalPool) -> None:
    with pytest.raises(Exception, match="pickle"):
        pool.submit(double, lambda: None).result(30)
    assert pool.submit(double, 2).result(30) == 4


def test_pool_replaces_a_worker_after_max_tasks_per_child() -> None:
    pool = LocalPool(1, max_pixels=10**8, max_tasks_per_child=2)
    try:
        pids = [pool.submit(sleep_then_pid, 0).result(30) for _ in range(4)]
    finally:
        pool.shutdown()
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]
    wait_for(lambda: not alive(pids[1]))


def test_pool_shutdown_runs_queued_tasks_unless_cancelled() -> None:
    pool = LocalPool(1, max_pixels=10**8)
    queued: list[Future] = [pool.submit(sleep_then_pid, 0.2) for _ in range(3)]
    pool.shutdown(wait=True)
    assert all(future.done() and not future.cancelled() for future in queued)
    assert not alive(queued[-1].result())

    pool = LocalPool(1, max_pixels=10**8)
    first = pool.submit(sleep_then_pid, 0.5)
    rest = [pool.submit(sleep_then_pid, 0.5) for _ in range(3)]
    time.sleep(0.2)
    pool.shutdown(wait=True, cancel_futures=True)
    assert first.result() and all(future.cancelled() for future in rest)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(double, 1)


def test_pool_queued_task_says_when_it_starts() -> None:
    pool = LocalPool(1, max_pixels=10**8)
    try:
        pool.warm()
        first = pool.submit(sleep_then_pid, 0.5)
        second = pool.submit(sleep_then_pid, 0)
        starts: list[float] = []
        first.add_start_callback(lambda future, moment: starts.append(moment))
        second.add_start_callback(lambda future, moment: starts.append(moment))
        assert len(starts) == 1 and pool.backlog == 1  # the second waits in the pool
        assert first.result(30) == second.result(30)  # then runs on the one worker
    finally:
        pool.shutdown()
    assert starts[1] - starts[0] >= 0.5


def test_pool_start_callbacks_run_outside_its_lock() -> None:
    # The runner's start callback takes the engine's lock, held by whoever submits: were it
    # called under the pool's lock, a queued task starting would deadlock the two threads.
    pool = LocalPool(1, max_pixels=10**8)
    submitted: list[Future] = []
    try:
        pool.warm()
        pool.submit(sleep_then_pid, 0.3)
        queued = pool.submit(sleep_then_pid, 0)
        queued.add_start_callback(lambda future, moment: submitted.append(
            pool.submit(double, 5)))  # takes the pool's lock: would hang if held
        assert wait_for(lambda: submitted, timeout=10)[0].result(10) == 10
    finally:
        pool.shutdown(wait=False)
