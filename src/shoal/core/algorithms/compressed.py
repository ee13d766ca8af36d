"""Flat allreduce with 16 or 8 bits on the wire: ``allreduce_fp16``, ``allreduce_bf16``, ``allreduce_int8``.

All are one-level chains (:mod:`._levels`) over the stream's group, run chunk by chunk on the stream's
worker (:mod:`._pipeline`), so that casting chunk k+1 overlaps chunk k on the wire. What the chain
guarantees: scaling before the cast (overflow-safe), 16 or 8 bits on the wire but a float32 sum on gloo,
the same bits on every rank, and error feedback (optional for 16 bits, always for 8). See
docs/compression.md for the measurements behind each choice.

8 bits keep one more promise: what follows the bucket's last tensor (the negotiation's control slot,
whose "non-zero" must survive the sum) travels in full precision, not in a block scaled by its
neighbours (:func:`exact_tail`).

Example (what :func:`shoal.core.algorithms.get_algorithm` returns for ``compression="fp16"``)::

    fut = allreduce_fp16(bucket, ctx)      # bucket: flat float32; ctx: a ReduceContext
    fut.wait()                             # bucket holds the reduced, scaled result
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ._levels import make_level, reduce_chain, scale_factors
from ._pipeline import worker_for

__all__ = ["allreduce_fp16", "allreduce_bf16", "allreduce_int8", "covered_numel", "exact_tail"]


def covered_numel(buffer: torch.Tensor, ctx) -> int:
    """Elements of ``buffer`` up to the end of its last tensor (``ctx.layout``; the whole buffer when the
    caller gave no layout)."""
    layout = ctx.layout() if ctx.layout is not None else None
    if not layout:
        return buffer.numel()
    end = 0
    for offset, shape in layout:
        n = 1
        for d in shape:
            n *= d
        end = max(end, offset + n)
    return min(end, buffer.numel())


def exact_tail(buffer: torch.Tensor, ctx, job: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Run ``job`` on the part of ``buffer`` its tensors cover, and sum what follows them in full precision
    on ``ctx.group`` (one small ``all_reduce``, issued first, from the caller's thread: the stream's
    worker). Scales the tail as ``ctx`` says. Returns ``buffer``."""
    covered = covered_numel(buffer, ctx)
    work = None
    if covered < buffer.numel():
        tail = buffer[covered:]
        if ctx.prescale != 1.0:
            tail.mul_(ctx.prescale)
        work = dist.all_reduce(tail, group=ctx.group, async_op=True)
    job(buffer[:covered])
    if work is not None:
        work.wait()
        if ctx.postscale != 1.0:
            buffer[covered:].mul_(ctx.postscale)
    return buffer


def _allreduce_16bit(buffer: torch.Tensor, ctx, wire_dtype: torch.dtype,
                     error_feedback: bool) -> torch.futures.Future:
    n = ctx.process_set.size()
    level = make_level(ctx.group, wire_dtype)
    before, after = scale_factors(ctx.prescale, ctx.postscale, n, compressed=True)
    worker = worker_for(ctx.group)
    state = ctx.state
    return worker.submit(lambda: reduce_chain(buffer, [level], before, after, state, worker, error_feedback))


def allreduce_fp16(buffer: torch.Tensor, ctx, *, error_feedback: bool = False) -> torch.futures.Future:
    """Sum ``buffer`` across ``ctx.group`` with float16 on the wire; scale as ``ctx`` says; in place.

    Args:
        buffer: a flat bucket (float32 usually).
        ctx: a :class:`~shoal.core.algorithms.ReduceContext`; ``ctx.state`` keeps error-feedback residuals.
        error_feedback: add what the previous step's rounding dropped before rounding again.

    Returns:
        A future whose value is ``buffer``.
    """
    return _allreduce_16bit(buffer, ctx, torch.float16, error_feedback)


def allreduce_bf16(buffer: torch.Tensor, ctx, *, error_feedback: bool = False) -> torch.futures.Future:
    """:func:`allreduce_fp16` with bfloat16 on the wire (float32's range: no overflow concern)."""
    return _allreduce_16bit(buffer, ctx, torch.bfloat16, error_feedback)



def allreduce_int8(buffer: torch.Tensor, ctx) -> torch.futures.Future:
    """Sum ``buffer`` across ``ctx.group`` with 8-bit blocks on the wire (a float32 scale per
    :data:`~shoal.core.compression.INT8_BLOCK` values), summed in float32, error feedback always on
    (residuals in ``ctx.state``); the tail after the last tensor in full precision; scale as ``ctx``
    says; in place.

    Returns:
        A future whose value is ``buffer``.
    """
    n = ctx.process_set.size()
    level = make_level(ctx.group, torch.int8)
    before, after = scale_factors(ctx.prescale, ctx.postscale, n, compressed=True)
    worker = worker_for(ctx.group)
    state = ctx.state

    def job() -> torch.Tensor:
        return exact_tail(buffer, ctx, lambda part: reduce_chain(part, [level], before, after, state, worker,
                                                                True))

    return worker.submit(job)
