"""The run_ranks harness itself: values come back, failures are reported root cause first, the deadline
kills what hangs and shows its stack, and a process-group timeout at or above the deadline is refused."""

from __future__ import annotations

import os
import time

import pytest

from shoal.testing import RanksFailed, run_ranks


def _rank_and_size():
    from shoal.core import runtime as rt

    return (rt.rank(), rt.size(), rt.is_initialized())


def _env_only():
    # init=False: the launcher's variables are there, the runtime is not started.
    from shoal.core import runtime as rt

    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), rt.is_initialized())


def test_returns_each_rank_value():
    assert run_ranks(_rank_and_size, world_size=2, timeout_s=30) == [(0, 2, True), (1, 2, True)]
    assert run_ranks(_env_only, world_size=3, timeout_s=30, init=False) == [(0, 3, False), (1, 3, False),
                                                                           (2, 3, False)]


def _rank1_raises_then_rank0_fails():
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.ones(1))  # fails once rank 1 has gone


def test_raising_rank_is_reported_first():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_rank1_raises_then_rank0_fails, world_size=2, timeout_s=30, pg_timeout_s=5)
    report = str(info.value)
    assert report.startswith("_rank1_raises_then_rank0_fails: ")
    assert info.value.by_rank(1).status == "error" and "boom on rank 1" in info.value.by_rank(1).error
    # Root cause first: rank 1's own error comes before whatever rank 0 reported (error or killed).
    first = report.index("rank 1: raised")
    assert "ValueError: boom on rank 1" in report[first:]
    assert first < report.index("rank 0: ")


def _sleepy_rank():
    if int(os.environ["RANK"]) == 1:
        time.sleep(60)
    return "done"


def test_deadline_kills_a_sleeping_rank_and_shows_its_stack():
    start = time.monotonic()
    with pytest.raises(RanksFailed) as info:
        run_ranks(_sleepy_rank, world_size=2, timeout_s=3, pg_timeout_s=1, init=False)
    assert time.monotonic() - start < 15
    report = str(info.value)
    assert "deadline of 3 s passed" in report
    assert info.value.by_rank(0).status == "ok" and info.value.by_rank(0).value == "done"
    assert info.value.by_rank(1).status == "killed"
    assert "_sleepy_rank" in report  # the stack faulthandler dumped before the kill


def test_pg_timeout_must_be_below_the_deadline():
    with pytest.raises(ValueError, match="pg_timeout_s"):
        run_ranks(_env_only, world_size=2, timeout_s=10, pg_timeout_s=10)
    with pytest.raises(ValueError, match="pg_timeout_s"):
        run_ranks(_env_only, world_size=2, timeout_s=10, pg_timeout_s=20)
