"""Horovod's ``grouped_allgather`` / ``grouped_reducescatter`` on 3 real gloo ranks, against the per-tensor
collectives' definitions (exact: integers and sums of small integers in fp32)."""

from __future__ import annotations

import torch

from shoal.testing import run_ranks


def _rank_grouped():
    import shoal.torch as hvd  # noqa: PLC0415

    me, n = hvd.rank(), hvd.size()
    out = {}
    # allgather: first dimensions differ per rank and per tensor; dtypes differ per tensor.
    xs = [torch.full((me + 1, 2), float(me)), torch.arange(me, dtype=torch.int64), torch.ones(1, 3) * me]
    got = hvd.grouped_allgather(xs, name="g")
    want = [torch.cat([torch.full((r + 1, 2), float(r)) for r in range(n)]),
            torch.cat([torch.arange(r, dtype=torch.int64) for r in range(n)]),
            torch.cat([torch.ones(1, 3) * r for r in range(n)])]
    out["allgather"] = all(torch.equal(a, b) for a, b in zip(got, want))
    h = hvd.grouped_allgather_async(xs)
    out["async"] = all(torch.equal(a, b) for a, b in zip(hvd.synchronize(h), want))
    out["empty"] = hvd.grouped_allgather([]) == [] and hvd.grouped_reducescatter([]) == []
    # reducescatter: Horovod's split of 5 rows over 3 ranks is 2, 2, 1.
    ys = [torch.arange(10.0).reshape(5, 2) * (me + 1), torch.ones(4) * (me + 1)]
    total = sum(range(1, n + 1))
    rows = [2, 2, 1][me]
    lo = [0, 2, 4][me]
    s = hvd.grouped_reducescatter(ys, op=hvd.Sum)
    out["reducescatter_sum"] = (torch.equal(s[0], torch.arange(10.0).reshape(5, 2)[lo:lo + rows] * total)
                                and torch.equal(s[1], torch.full(([2, 1, 1][me],), float(total))))
    a = hvd.grouped_reducescatter(ys, name="rs", op=hvd.Average, postscale_factor=3.0)
    out["reducescatter_avg"] = torch.allclose(a[0], torch.arange(10.0).reshape(5, 2)[lo:lo + rows] * total / n * 3)
    # Differentiable, with Horovod's backward (an Average-allreduce of the gradient): the gradient of
    # sum(allgather(x) * w) is this rank's rows of w (every rank computes the same loss).
    x = torch.ones(me + 1, 2, requires_grad=True)
    (g,) = hvd.grouped_allgather([x])
    (g * torch.arange(float(g.numel())).reshape(g.shape)).sum().backward()
    start = sum(r + 1 for r in range(me)) * 2
    out["grad"] = torch.equal(x.grad, torch.arange(start, start + x.numel(), dtype=torch.float32)
                              .reshape(x.shape))
    # A shape mismatch names the member tensor.
    try:
        hvd.grouped_reducescatter([torch.ones(4), torch.ones(3 if me == 1 else 6)], name="bad")
        out["mismatch"] = "no error"
    except hvd.MismatchError as exc:
        out["mismatch"] = str(exc)
    return out


def test_grouped_allgather_and_reducescatter():
    for r in run_ranks(_rank_grouped, world_size=3, timeout_s=60):
        for key in ("allgather", "async", "empty", "reducescatter_sum", "reducescatter_avg", "grad"):
            assert r[key] is True, (key, r)
        assert "bad.1" in r["mismatch"] and "rank 1" in r["mismatch"], r["mismatch"]
