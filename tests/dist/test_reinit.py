"""``shutdown()`` then ``init()`` in one process (Horovod's tests do it between every test; elastic training
builds a new world the same way): each world gets its own prefix in the job's store, so no init meets the
keys of an earlier one (before: "Connection refused" in the second init, or a hang in ``new_group``); an
optimizer built in one world keeps working in the next, starting over at step 0 with new buckets."""

from __future__ import annotations

import torch

from shoal.testing import run_ranks


def _rank_reinit():
    import shoal.torch as hvd  # noqa: PLC0415
    from shoal.core import runtime  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    out = {"sums": [], "steps": [], "generations": [], "initialized": []}
    g = torch.Generator().manual_seed(hvd.rank())
    for world in range(3):
        out["sums"].append(hvd.allreduce(torch.ones(2) * (hvd.rank() + 1), op=hvd.Sum).tolist())
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 3, generator=g)).pow(2).sum().backward()
            opt.step()
        out["steps"].append(opt.engine.step)
        out["generations"].append(runtime.generation())
        hvd.shutdown()
        out["initialized"].append(hvd.is_initialized())
        hvd.init()
    w = model.weight.detach().clone()
    out["same_weights"] = bool(torch.equal(hvd.broadcast(w, root_rank=0), w))
    return out


def test_shutdown_then_init_builds_a_new_world_each_time():
    for r in run_ranks(_rank_reinit, world_size=2, timeout_s=60):
        assert r["sums"] == [[3.0, 3.0]] * 3
        assert r["steps"] == [2, 2, 2]  # the optimizer starts over in each world
        assert r["generations"] == [1, 2, 3] and r["initialized"] == [False] * 3
        assert r["same_weights"]


def _rank_late_start():
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    if int(os.environ["RANK"]) == 1:
        time.sleep(2.5)  # rank 1 comes late: longer than timeout_s, well within start_timeout_s
    hvd.init(timeout_s=1.0)
    return hvd.allreduce(torch.ones(1), op=hvd.Sum).item()


def test_ranks_that_start_further_apart_than_timeout_s_still_start():
    """Starting is not a collective (jobstore, constraint 5): before, gloo's connect gave up after
    ``timeout_s`` waiting for the late rank's address ("wait timeout after 1000ms")."""
    assert run_ranks(_rank_late_start, world_size=2, timeout_s=40, init=False) == [2.0, 2.0]


def test_a_rank_that_never_starts_is_named():
    import datetime  # noqa: PLC0415

    import pytest  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from shoal.core import jobstore  # noqa: PLC0415

    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=5))
    with pytest.raises(TimeoutError, match=r"rank\(s\) 1, 2 of 3 did not reach init\(\) within start_timeout_s=0.2 s"):
        jobstore.await_start(store, 0, 3, 0.2)
