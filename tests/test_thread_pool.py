"""The C++ core's thread pool runs every task of every job exactly once, under heavy preemption.

`_core.pool_self_check(threads, jobs, max_tasks)` drives a private pool through back-to-back jobs whose task
counts change from job to job and returns how many jobs ran some task index other than once (or an index
beyond the job). More threads than cores make the scheduler preempt workers between any two steps of the
claim protocol; a protocol that let a worker from a finished job claim an index of the next one failed this
at about one job in 10^4 on 2 cores (8 threads, up to 8 tasks).
"""

from __future__ import annotations

import pytest

from lenvm_rt import _core


@pytest.mark.parametrize(("threads", "jobs", "max_tasks"), [(8, 400_000, 8), (16, 100_000, 64), (3, 100_000, 5)])
def test_every_task_of_every_job_runs_exactly_once(threads: int, jobs: int, max_tasks: int) -> None:
    assert _core.pool_self_check(threads, jobs, max_tasks) == 0


def test_single_threaded_pool_and_zero_jobs() -> None:
    assert _core.pool_self_check(1, 1000, 64) == 0
    assert _core.pool_self_check(4, 0, 1) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 10, 8), "num_threads"), ((4, -1, 8), "jobs"), ((4, 10, 0), "max_tasks"), ((4, 10, 5000), "max_tasks")],
)
def test_bad_arguments_are_named(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _core.pool_self_check(*args)
    assert _core.pool_self_check(2, 100, 4) == 0
