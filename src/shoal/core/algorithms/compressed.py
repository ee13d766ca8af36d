"""Flat allreduce with 16 bits on the wire: ``allreduce_fp16`` and ``allreduce_bf16``.

Both are one-level chains (:mod:`._levels`) over the stream's group, run chunk by chunk on the stream's
worker (:mod:`._pipeline`), so that casting chunk k+1 overlaps chunk k on the wire. What the chain
guarantees: scaling before the cast (overflow-safe), 16 bits on the wire but a float32 sum on gloo,
the same bits on every rank, and optional error feedback. See docs/compression.md for the measurements
behind each choice.

Example (what :func:`shoal.core.algorithms.get_algorithm` returns for ``compression="fp16"``)::

    fut = allreduce_fp16(bucket, ctx)      # bucket: flat float32; ctx: a ReduceContext
    fut.wait()                             # bucket holds the reduced, scaled result
"""

from __future__ import annotations

import torch

from ._levels import make_level, reduce_chain, scale_factors
from ._pipeline import worker_for

__all__ = ["allreduce_fp16", "allreduce_bf16"]


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

