"""The fair queue: round-robin over owners, then over each owner's jobs; in order within a
job."""

from __future__ import annotations

import pytest

from imgserver.jobs.fairqueue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    return [queue.pop() for _ in range(len(queue))]


def test_fairqueue_takes_turns_between_jobs_in_order_within_each() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ("a1", "a2", "a3", "a4"):
        queue.push("", "a", item)
    queue.push("", "b", "b1")
    queue.push("", "b", "b2")
    queue.push("", "c", "c1")
    assert len(queue) == 7
    assert drain(queue) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    assert not queue


def test_fairqueue_small_job_behind_a_batch_waits_one_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    for index in range(10_000):
        queue.push("", "batch", f"batch{index}")
    assert queue.pop() == "batch0"  # the batch is running
    queue.push("", "small", "small0")
    assert [queue.pop(), queue.pop()] == ["batch1", "small0"]


def test_fairqueue_push_front_runs_first_and_takes_the_next_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("", "a", "a1")
    queue.push("", "b", "b1")
    queue.push("", "b", "b2")
    queue.push_front("", "c", "c0")  # a job with nothing waiting: its image runs next
    queue.push_front("", "b", "b0")  # a job with images waiting: first of them, same turn
    assert drain(queue) == ["c0", "a1", "b0", "b1", "b2"]


def test_fairqueue_remove_takes_out_one_job() -> None:
    queue: FairQueue[str] = FairQueue()
    for key in "abc":
        queue.push("", key, key + "1")
        queue.push("", key, key + "2")
    assert queue.remove("", "b") == ["b1", "b2"]
    assert queue.remove("", "b") == []
    assert list(queue.keys()) == ["a", "c"]
    assert drain(queue) == ["a1", "c1", "a2", "c2"]
    with pytest.raises(IndexError):
        queue.pop()


def test_fairqueue_takes_turns_between_owners_then_between_their_jobs() -> None:
    queue: FairQueue[str] = FairQueue()
    for job in ("a", "b"):  # owner A: two jobs of four images
        for n in range(1, 5):
            queue.push("A", job, f"{job}{n}")
    for n in range(1, 5):  # owner C: one job of four
        queue.push("C", "c", f"c{n}")
    assert drain(queue) == ["a1", "c1", "b1", "c2", "a2", "c3", "b2", "c4",
                            "a3", "b3", "a4", "b4"]


def test_fairqueue_a_flood_of_jobs_takes_one_owners_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    for job in range(1000):  # owner A floods: a thousand one-image jobs
        queue.push("A", f"flood{job}", f"f{job}")
    queue.push("B", "mine", "m1")
    queue.push("B", "mine", "m2")
    assert [queue.pop() for _ in range(4)] == ["f0", "m1", "f1", "m2"]
    assert list(queue.keys())[:2] == ["flood2", "flood3"]


def test_fairqueue_remove_and_push_front_keep_owners_in_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("A", "a", "a1")
    queue.push("B", "b", "b1")
    queue.push("B", "b", "b2")
    assert queue.remove("A", "a") == ["a1"]
    queue.push_front("C", "c", "c0")  # retried: runs next
    assert drain(queue) == ["c0", "b1", "b2"]
