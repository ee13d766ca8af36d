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
