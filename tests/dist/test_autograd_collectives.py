"""Differentiable collectives of shoal.torch: Horovod's backward passes, checked against the single-process
computation they stand for.

Horovod's conventions (horovod/torch/mpi_ops.py): allreduce's backward is an allreduce of the gradient
with the same op (the gradient of the ranks' summed losses); allgather's and broadcast's are an
Average-allreduce (the gradient of the ranks' *mean* loss); reducescatter's is an allgather times n for
Sum. Reference: every rank's input is built from a seed, so each rank can compute the whole forward (and
its gradient) on one process with ordinary tensor ops. Tolerance: float64, atol 1e-12.
"""

import torch

from shoal.testing import run_ranks


def _inputs(n):
    return [torch.arange(6, dtype=torch.float64).reshape(3, 2) * (r + 1) for r in range(n)]


def _check():
    import shoal.torch as hvd

    n, me = hvd.size(), hvd.rank()
    xs = _inputs(n)
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).reshape(3, 2)
    out = {}

    # allreduce (Average): loss = sum(w * mean_r x_r) -> dloss/dx_me = mean over ranks of w = w
    x = xs[me].clone().requires_grad_()
    (hvd.allreduce(x, name="ar") * w).sum().backward()
    out["allreduce"] = torch.allclose(x.grad, w, atol=1e-12)

    # grouped_allreduce (Sum): loss = sum(w * sum_r x_r) + 2 sum(sum_r y_r) -> w and 2, summed over ranks
    x, y = xs[me].clone().requires_grad_(), torch.ones(4, dtype=torch.float64, requires_grad=True)
    gx, gy = hvd.grouped_allreduce([x, y], name="gar", op=hvd.Sum)
    ((gx * w).sum() + 2 * gy.sum()).backward()
    out["grouped_allreduce"] = (torch.allclose(x.grad, n * w, atol=1e-12)
                                and torch.allclose(y.grad, torch.full((4,), 2.0 * n, dtype=torch.float64)))

    # allgather: each rank's loss = sum(v * cat(x_r)); the mean of the n equal losses has gradient = my
    # rows of v (the sum's would be n times that)
    x = xs[me].clone().requires_grad_()
    v = torch.arange(3 * n, dtype=torch.float64).unsqueeze(1)
    (hvd.allgather(x, name="ag") * v).sum().backward()
    out["allgather"] = torch.allclose(x.grad, v[3 * me:3 * me + 3].expand(3, 2), atol=1e-12)

    # broadcast from 0: only the root receives gradient, that of the mean loss
    x = xs[me].clone().requires_grad_()
    (hvd.broadcast(x, root_rank=0, name="bc") * w).sum().backward()
    expect = w if me == 0 else torch.zeros_like(w)
    out["broadcast"] = torch.allclose(x.grad, expect, atol=1e-12)

    # reducescatter of a (2n, 2) tensor, rank r gets rows [2r, 2r+2): Horovod's backward is the allgather
    # of the gradient, times n for Sum (times 1 for Average)
    x = torch.ones(2 * n, 2, dtype=torch.float64, requires_grad=True)
    hvd.reducescatter(x, name="rs", op=hvd.Sum).sum().backward()
    out["reducescatter"] = torch.allclose(x.grad, torch.full((2 * n, 2), float(n), dtype=torch.float64))
    x = torch.ones(2 * n, 2, dtype=torch.float64, requires_grad=True)
    hvd.reducescatter(x, name="rs_avg", op=hvd.Average, postscale_factor=3.0).sum().backward()
    out["reducescatter_avg"] = torch.allclose(x.grad, torch.full((2 * n, 2), 3.0, dtype=torch.float64))
    return out


def test_autograd_collectives_match_single_process():
    results = run_ranks(_check, world_size=2, timeout_s=60)
    for rank, res in enumerate(results):
        assert all(res.values()), f"rank {rank}: {res}"
