"""Adasum: Horovod's adaptive summation of gradients, as a per-bucket algorithm on any backend.

Adasum (Maleki et al., "Scaling Distributed Training with Adaptive Summation", MLSys 2021) combines two
gradients ``a`` and ``b`` of the same tensor as::

    adasum(a, b) = (1 - a.b / (2 |a|^2)) a + (1 - a.b / (2 |b|^2)) b

which is ``a + b`` for orthogonal gradients and ``a`` for identical ones (their average, not their sum), so
large-batch training needs no learning-rate scaling by the number of ranks. ``n`` ranks combine in a binary
tree: pairs at distance 1, then 2, 4, ... (Horovod's order: ``adasum(adasum(g0, g1), adasum(g2, g3))``).

Design constraints:

1. Per tensor. A bucket holds several tensors; each is combined with its own dot products (a bucket's
   ``segments`` give their sizes), as Horovod does: one dot product over a whole fused buffer would couple
   unrelated layers.
2. The same bits on every rank. Both members of a pair compute ``adasum(lower rank's, higher rank's)`` from
   the same two vectors with the same operations, so they hold identical results at every level and the
   last level leaves every rank with the same tensor (no broadcast needed).
3. Any backend, any number of ranks. Only point-to-point send/receive on the process set's group (gloo,
   NCCL and MPI all have them). Horovod refuses a world that is not a power of two; here the ``n - p`` ranks
   beyond the largest power of two ``p`` first hand their vector to a partner below ``p``, which combines
   the two, and get the result back at the end (one extra exchange for them, none for the others).
4. Numerics: dot products and squared norms accumulate in float64; 16-bit tensors are combined in float32
   and cast back once. A zero vector (a joined rank's contribution) leaves the other unchanged:
   ``adasum(a, 0) = a``.
5. Synchronous: the exchanges run in the caller's thread, in the caller's order, on the group it passes (the
   user collectives call it from the thread that issues every other operation on that group), and the
   returned future is already complete.

Cost: ``ceil(log2 n)`` exchanges of the whole vector (plus one for ranks beyond a power of two) and three
dot products per tensor per level; 2 ranks: one exchange, the same bytes as a ring allreduce.

What lives elsewhere: choosing the algorithm (:func:`shoal.core.algorithms.get_algorithm`), the user
collectives that call it (:mod:`shoal.core.collectives`), Horovod's delta optimizer on top of it
(:mod:`shoal.torch.adasum`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["allreduce_adasum", "adasum_combine"]

#: Below this squared norm a vector counts as zero (Horovod's threshold): its coefficient is 1.
_TINY_NORMSQ = 1e-8


def adasum_combine(a: torch.Tensor, b: torch.Tensor, segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``adasum(a, b)`` of two flat vectors, tensor by tensor (``segments``: the tensors' sizes, in order;
    None: one tensor). Returns a new tensor of ``a``'s dtype.

    Example:
        >>> adasum_combine(torch.tensor([1., 0.]), torch.tensor([0., 1.]))   # orthogonal: the sum
        tensor([1., 1.])
        >>> adasum_combine(torch.tensor([2., 2.]), torch.tensor([2., 2.]))   # equal: one of them
        tensor([2., 2.])
    """
    sizes = [a.numel()] if segments is None else list(segments)
    out = torch.empty_like(a)
    for x, y, o in zip(a.split(sizes), b.split(sizes), out.split(sizes)):
        x64, y64 = x.double(), y.double()
        dot = float(torch.dot(x64, y64))
        xx = float(torch.dot(x64, x64))
        yy = float(torch.dot(y64, y64))
        ca = 1.0 - dot / (2.0 * xx) if xx >= _TINY_NORMSQ else 1.0
        cb = 1.0 - dot / (2.0 * yy) if yy >= _TINY_NORMSQ else 1.0
        torch.add(x * ca, y, alpha=cb, out=o)
    return out


def _exchange(mine: torch.Tensor, peer: int, group) -> torch.Tensor:
    """Send ``mine`` to global rank ``peer`` and receive its vector of the same size."""
    theirs = torch.empty_like(mine)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, peer, group),
                                    dist.P2POp(dist.irecv, theirs, peer, group)])
    for w in works:
        w.wait()
    return theirs


def allreduce_adasum(buffer: torch.Tensor, ctx) -> torch.futures.Future:
    """Replace ``buffer`` (flat, contiguous, floating point) with the Adasum of every member's, in place.

    ``ctx.prescale`` multiplies before, ``ctx.postscale`` after; ``ctx.segments`` (sizes of the bucket's
    tensors) makes the combination per tensor (constraint 1). The future is complete when this returns
    (constraint 5); its value is ``buffer``.
    """
    ranks = list(ctx.process_set.ranks)
    me = ranks.index(dist.get_rank())
    n = len(ranks)
    work = buffer if buffer.dtype in (torch.float32, torch.float64) else buffer.float()
    if ctx.prescale != 1.0:
        work = work * ctx.prescale if work is buffer else work.mul_(ctx.prescale)
    segments = getattr(ctx, "segments", None)
    p = 1
    while p * 2 <= n:
        p *= 2
    vec = work.contiguous()
    if me >= p:  # constraint 3: fold into the partner below p, get the result back at the end
        partner = ranks[me - p]
        dist.send(vec, partner, group=ctx.group)
        result = torch.empty_like(vec)
        dist.recv(result, partner, group=ctx.group)
    else:
        if me + p < n:
            extra = torch.empty_like(vec)
            dist.recv(extra, ranks[me + p], group=ctx.group)
            vec = adasum_combine(vec, extra, segments)
        d = 1
        while d < p:
            partner = me ^ d
            theirs = _exchange(vec, ranks[partner], ctx.group)
            vec = adasum_combine(vec, theirs, segments) if me < partner else adasum_combine(theirs, vec, segments)
            d *= 2
        if me + p < n:
            dist.send(vec, ranks[me + p], group=ctx.group)
        result = vec
    if ctx.postscale != 1.0:
        result = result * ctx.postscale
    with torch.no_grad():
        buffer.copy_(result.view_as(buffer))
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buffer)
    return fut
