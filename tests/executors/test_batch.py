"""How images are put in batches for a Dask cluster: the plan, the estimate, the start."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from imgserver.executors.batch import Call, Estimate, Item, plan
from imgserver.executors.batcher import Batcher
from imgserver.executors.started import HeldFuture


def test_plan_small_images_go_together_up_to_the_budget() -> None:
    assert plan([0.05] * 10, 10, budget=0.2) == 4
    assert plan([0.01] * 100, 100, budget=0.2, most=16) == 16  # however fast


def test_plan_big_image_goes_alone() -> None:
    assert plan([0.5, 0.01, 0.01], 3, budget=0.2) == 1           # first: alone
    assert plan([0.01, 0.01, 0.5, 0.01], 4, budget=0.2) == 2     # stops before it
    assert plan([0.01, 0.5], 2, budget=0.2) == 1


def test_plan_takes_at_most_the_share() -> None:
    assert plan([0.01] * 8, 2, budget=0.2) == 2
    assert plan([0.01] * 3, 0, budget=0.2) == 1  # one, whatever the share
    assert plan([0.01] * 3, 5, budget=0.2) == 3  # no more than wait


def test_batcher_splits_images_arriving_together_evenly_between_free_threads() -> None:
    batcher = batcher_of({"worker-a": 1, "worker-b": 1})
    client = Recorder()
    for _ in range(20):
        batcher.add(Item(HeldFuture(), Call(print), 1000))
    batcher.pump(client)
    # Half each, so that both end together (not 10, then 5 on the other, then the rest in
    # small batches, each a round trip through the scheduler).
    assert sorted(client.sent) == [("worker-a", 10), ("worker-b", 10)]
    for _ in range(6):
        batcher.add(Item(HeldFuture(), Call(print), 1000))
    batcher.pump(client)
    assert len(client.sent) == 2  # both threads hold their batch until its last image starts


@pytest.mark.parametrize(("workers", "images", "sizes"), [
    ({f"w{n}": 1 for n in range(8)}, 9, [2, 1, 1, 1, 1, 1, 1, 1]),
    ({f"w{n}": 1 for n in range(4)}, 5, [2, 1, 1, 1]),
    ({f"w{n}": 1 for n in range(4)}, 10, [3, 3, 2, 2]),
    ({"w0": 3}, 4, [2, 1, 1]),
])
def test_batcher_spreads_a_few_images_over_every_free_thread(
        workers: dict[str, int], images: int, sizes: list[int]) -> None:
    batcher = batcher_of(workers)
    client = Recorder()
    for _ in range(images):
        batcher.add(Item(HeldFuture(), Call(print), 1000))
    batcher.pump(client)
    assert [size for _, size in client.sent] == sizes  # no thread idle while two queue


def test_batcher_gives_a_thread_freed_meanwhile_enough_to_end_with_the_others() -> None:
    batcher = batcher_of({"worker-a": 1, "worker-b": 1})
    client = Recorder()
    for _ in range(3):  # a job's first images, handed over before the rest
        batcher.add(Item(HeldFuture(), Call(print), 1000))
    batcher.pump(client)
    assert client.sent == [("worker-a", 2), ("worker-b", 1)]
    for _ in range(17):
        batcher.add(Item(HeldFuture(), Call(print), 1000))
    batcher.reported(["start", client.numbers[0], 2])
    batcher.reported(["start", client.numbers[1], 1])  # b's only image starts: b is free
    batcher.pump(client)
    assert client.sent[2] == ("worker-b", 9)  # 17 waiting and 1 of a's not started: 9 each
    batcher.reported(["start", client.numbers[2], 9])
    batcher.reported(["ended", client.numbers[0], [[0, True, b""]]])  # a's last one starts
    batcher.pump(client)
    # All 8 left, to end with b's 8 not started; not half of them, then half again.
    assert client.sent[3] == ("worker-a", 8)


def batcher_of(workers: dict[str, int]) -> Batcher:
    """A batcher over ``workers`` (name: threads) whose images take a millisecond each, so
    that the budget never limits a batch."""
    batcher = Batcher("topic", lambda number, task: None, budget=0.5, most=64, interval=0.2)
    batcher.workers = workers
    batcher.estimate.timed(1000, 0.001)
    return batcher


class Recorder:
    """Stands for distributed.Client where only what is sent matters: the worker and the
    number of images of each batch."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.numbers: list[int] = []  # of each batch sent

    def submit(self, fn: Callable[..., Any], topic: str, number: int, calls: list[Call],
               interval: float, *, workers: list[str], **options: Any) -> Future:
        self.sent.append((workers[0], len(calls)))
        self.numbers.append(number)
        return Future()


def test_estimate_follows_the_time_per_byte() -> None:
    estimate = Estimate()
    assert estimate.batch_size() == 1
    # Untimed: pessimistic, so that a 12 MP photo goes alone and 1080p JPEGs go in pairs.
    assert plan([estimate.seconds(3_500_000)] + [estimate.seconds(100)] * 9, 10) == 1
    assert plan([estimate.seconds(520_000)] * 20, 20) == 2
    for _ in range(50):
        estimate.handed(500_000)
        estimate.timed(500_000, 0.02)
    assert abs(estimate.seconds(1_000_000) - 0.04) < 1e-9
    assert estimate.batch_size(budget=0.2) == 10
    for _ in range(50):
        estimate.timed(500_000, 0.2)  # the work changed: ten times slower
    assert estimate.batch_size(budget=0.2) == 1


def test_held_future_runs_its_start_callbacks_once_started() -> None:
    future = HeldFuture()
    seen: list[tuple[Future, float]] = []
    future.add_start_callback(lambda f, moment: seen.append((f, moment)))
    assert not future.running() and seen == []
    future.mark_started(12.5)
    future.mark_started(13.0)  # a second report changes nothing
    assert future.running() and seen == [(future, 12.5)]
    future.add_start_callback(lambda f, moment: seen.append((f, moment)))  # late: at once
    assert seen == [(future, 12.5), (future, 12.5)]
    future.set_result(1)
    assert future.result() == 1
