"""How images are put in batches for a Dask cluster: the plan, the estimate, the start."""

from __future__ import annotations

from concurrent.futures import Future

from imgserver.executors.batch import Estimate, plan
from imgserver.executors.started import HeldFuture


def test_plan_small_images_go_together_up_to_the_budget() -> None:
    assert plan([0.05] * 10, 1, budget=0.2) == 4
    assert plan([0.01] * 100, 1, budget=0.2, most=16) == 16  # however fast


def test_plan_big_image_goes_alone() -> None:
    assert plan([0.5, 0.01, 0.01], 1, budget=0.2) == 1           # first: alone
    assert plan([0.01, 0.01, 0.5, 0.01], 1, budget=0.2) == 2     # stops before it
    assert plan([0.01, 0.5], 1, budget=0.2) == 1


def test_plan_spreads_the_last_images_over_the_threads() -> None:
    assert plan([0.01] * 8, 4, budget=0.2) == 2
    assert plan([0.01] * 3, 4, budget=0.2) == 1


def test_estimate_follows_the_time_per_byte() -> None:
    estimate = Estimate()
    assert estimate.batch_size() == 1
    # Untimed: pessimistic, so that a 12 MP photo goes alone and 1080p JPEGs go in pairs.
    assert plan([estimate.seconds(3_500_000)] + [estimate.seconds(100)] * 9, 1) == 1
    assert plan([estimate.seconds(520_000)] * 20, 1) == 2
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
