"""Differentiable collectives of shoal.torch: gradients equal those of the single-process computation.

Reference: every rank's input is built from a seed, so each rank can compute the whole forward (and its
gradient) on one process with ordinary tensor ops. Tolerance: float64, atol 1e-12.
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

    # allgather: loss = sum(v * cat(x_r)) with per-row weights -> grad = n * my rows of v (each rank's loss)
    x = xs[me].clone().requires_grad_()
    v = torch.arange(3 * n, dtype=torch.float64).unsqueeze(1)
    (hvd.allgather(x, name="ag") * v).sum().backward()
    out["allgather"] = torch.allclose(x.grad, n * v[3 * me:3 * me + 3].expand(3, 2), atol=1e-12)

    # broadcast from 0: only the root receives gradient, summed over ranks
    x = xs[me].clone().requires_grad_()
    (hvd.broadcast(x, root_rank=0, name="bc") * w).sum().backward()
    expect = n * w if me == 0 else torch.zeros_like(w)
    out["broadcast"] = torch.allclose(x.grad, expect, atol=1e-12)

    # reducescatter (Sum) of a (2n, 2) tensor: rank r gets rows [2r, 2r+2) of the sum
    x = torch.ones(2 * n, 2, dtype=torch.float64, requires_grad=True)
    hvd.reducescatter(x, name="rs", op=hvd.Sum).sum().backward()
    out["reducescatter"] = torch.allclose(x.grad, torch.ones(2 * n, 2, dtype=torch.float64), atol=1e-12)
    return out


def test_autograd_collectives_match_single_process():
    results = run_ranks(_check, world_size=2, timeout_s=60)
    for rank, res in enumerate(results):
        assert all(res.values()), f"rank {rank}: {res}"
