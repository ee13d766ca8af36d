"""Flat allreduce: one ``all_reduce`` over the whole process set, scaled as Horovod does."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["allreduce_flat"]


def allreduce_flat(buffer: torch.Tensor, ctx) -> torch.futures.Future:
    """Sum ``buffer`` across ``ctx.group`` in place; multiply by ``ctx.prescale`` before and
    ``ctx.postscale`` after. The future's value is ``buffer``. The post-multiply runs as a future callback
    on the backend's completion thread, off the caller's critical path."""
    if ctx.prescale != 1.0:
        buffer.mul_(ctx.prescale)
    fut = dist.all_reduce(buffer, group=ctx.group, async_op=True).get_future()
    post = ctx.postscale

    def scale(f: torch.futures.Future) -> torch.Tensor:
        f.value()  # re-raises a backend error
        return buffer.mul_(post) if post != 1.0 else buffer

    return fut.then(scale)
