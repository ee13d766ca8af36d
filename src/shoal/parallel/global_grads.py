"""Decisions over all gradients of a model with sharded parameters: norm clipping and GradScaler's inf check.

Owns :func:`clip_grad_norm_` and :func:`sync_grad_scaler_`. What lives elsewhere: the mark of sharded
parameters (:mod:`shoal.core.no_sync`), the data-parallel averaging (Shoal's DistributedOptimizer, DDP).

Design constraints:

1. With a class-sharded classifier each rank holds the gradient of its own rows only. A decision taken
   from local gradients (torch's ``clip_grad_norm_``, GradScaler's ``found_inf``) then differs across
   ranks: each rank clips by another factor, or one rank skips a step the others take, and the replicated
   backbone drifts apart silently. Every such decision must be taken on the global value, the same on
   every rank.
2. The global norm is that of one process holding the whole model: data-parallel gradients (averaged, so
   equal on every rank) count once, sharded gradients once per shard. So ``||g||^p = ||g_replicated||^p
   + sum over ranks ||g_shard||^p``: one allreduce of two numbers, whatever the model size.
3. Replicated gradients that are not equal on every rank (clipping before the data-parallel average) would
   give a wrong norm: the same allreduce carries their sum, and a mismatch warns with the fix.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from shoal.core.errors import ShoalError

from ._ops import _resolve_shards
from shoal.core.no_sync import no_sync_matcher

__all__ = ["clip_grad_norm_", "sync_grad_scaler_"]


def clip_grad_norm_(parameters: Union[Tensor, Iterable[Tensor]], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, process_set=None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose sharded parameters differ across ranks; a collective.

    Computes the norm of all gradients as one process holding the whole model would (constraint 2) and
    scales every gradient by ``max_norm / (norm + 1e-6)`` when that is below 1, the same factor on every
    rank. Parameters marked ``_shoal_no_sync`` (PartialFC's weight) are the shards; all others must hold
    the data-parallel gradient, already averaged: call it after ``optimizer.synchronize()`` (Shoal's
    DistributedOptimizer) or after backward (DDP).

    Args:
        parameters: every parameter of the model (backbone and classifier), or one tensor.
        max_norm: the largest global norm let through.
        norm_type: p of the p-norm; ``float("inf")`` for the largest absolute value.
        error_if_nonfinite: raise (on every rank alike) when the global norm is nan or inf.
        process_set: the ranks sharing the classifier (PartialFC's ``process_set``; default: all).

    Returns:
        The global norm before clipping, identical on every rank.

    Raises:
        RuntimeError: ``error_if_nonfinite`` and the global norm is not finite.

    Example:
        >>> loss.backward()
        >>> opt.synchronize()                            # the backbone's gradients, averaged
        >>> shoal.parallel.clip_grad_norm_(model.parameters(), max_norm=5.0)
        >>> with opt.skip_synchronize():
        ...     opt.step()
    """
    params = [parameters] if torch.is_tensor(parameters) else list(parameters)
    sharded = no_sync_matcher()
    grads = [p.grad for p in params if p.grad is not None]
    shard_grads = [p.grad for p in params if p.grad is not None and sharded(p)]
    replicated = [p.grad for p in params if p.grad is not None and not sharded(p)]
    shards = _resolve_shards(process_set)
    p = float(norm_type)
    # float64 when any gradient is float64 (the reference tests), else float32 (16-bit norms overflow).
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32

    def local(gs: list[Tensor]) -> Tensor:
        norms = [torch.linalg.vector_norm(g, p, dtype=acc).to(shards.device) for g in gs]
        if not norms:
            return torch.zeros((), dtype=acc, device=shards.device)
        stacked = torch.stack(norms)
        return stacked.max() if math.isinf(p) else stacked.pow(p).sum()

    packed = torch.stack([local(shard_grads), local(replicated)])
    if shards.distributed:
        op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
        mine = packed[1].clone()
        dist.all_reduce(packed, op=op, group=shards.group)
        if not math.isinf(p):
            _warn_if_replicated_differ(mine, packed[1], shards.size)
            packed[1] /= shards.size  # the mean over ranks: the same factor everywhere, even if they differ
    total = packed.max() if math.isinf(p) else packed.sum().pow(1.0 / p)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"shoal: the global {p:g}-norm of the gradients is {float(total)} (the same on every rank), so "
            "they cannot be clipped. HINT: pass error_if_nonfinite=False to skip this check (the gradients "
            "are then scaled by nan), or find the parameter with nan_check='raise'.")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return total


def _warn_if_replicated_differ(mine: Tensor, summed: Tensor, size: int) -> None:
    # Equal gradients sum to size x each rank's value up to rounding (1e-7 relative per addition in float32).
    if abs(float(summed) - size * float(mine)) > 1e-4 * max(abs(float(summed)), 1e-30):
        warnings.warn(
            "shoal: clip_grad_norm_: the data-parallel (not sharded) gradients differ across ranks, so the "
            "global norm uses their mean. HINT: clip after the data-parallel average: call "
            "optimizer.synchronize() first (and step inside optimizer.skip_synchronize()), or under DDP "
            "clip after backward.", stacklevel=3)


def sync_grad_scaler_(scaler, optimizer: torch.optim.Optimizer, process_set=None) -> bool:
    """Make a GradScaler's inf/nan decision global, after ``scaler.unscale_(optimizer)``; a collective.

    GradScaler checks only this rank's gradients: an overflow in one rank's classifier shard (its gradient is
    never averaged, so no other rank sees it) would skip the step on that rank alone, and the backbone
    would drift apart. This takes the maximum of ``found_inf`` over the ranks, so that ``scaler.step`` skips
    on every rank or on none, and ``scaler.update`` changes the scale alike.

    Returns:
        True when some rank found a non-finite gradient (the step will be skipped everywhere).

    Raises:
        ShoalError: ``unscale_`` was not called for this optimizer in this step.

    Example:
        >>> scaler.scale(loss).backward()
        >>> opt.synchronize()
        >>> scaler.unscale_(opt)
        >>> shoal.parallel.sync_grad_scaler_(scaler, opt)
        >>> shoal.parallel.clip_grad_norm_(model.parameters(), 5.0)
        >>> with opt.skip_synchronize():
        ...     scaler.step(opt)
        >>> scaler.update()
    """
    if not getattr(scaler, "is_enabled", lambda: True)():
        return False  # a disabled scaler never skips (the same on every rank: built with the same flag)
    # GradScaler keeps the per-device flags that unscale_ computed in this private table (torch 2.x).
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    found = (state.get("found_inf_per_device") if isinstance(state, dict) else None) or {}
    shards = _resolve_shards(process_set)
    # [any inf here, unscale_ missing here]: a rank that cannot answer still joins the allreduce, so that
    # every rank raises instead of the others waiting for it.
    flags = torch.zeros(2, device=shards.device)
    if found:
        flags[0] = torch.stack([t.detach().float().to(shards.device).reshape(()) for t in found.values()]).max()
    else:
        flags[1] = 1.0
    if shards.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=shards.group)
    if flags[1] > 0:
        me = dist.get_rank() if dist.is_initialized() else 0  # world rank, as in every message of shoal
        raise ShoalError(
            f"shoal: sync_grad_scaler_ on rank {me}: some rank has no inf check for this optimizer in "
            "this step. HINT: call scaler.unscale_(optimizer) on every rank first, with the optimizer that "
            "is passed to scaler.step() (the same object: the DistributedOptimizer if you wrap one).")
    for t in found.values():
        t.fill_(float(flags[0]))
    return bool(flags[0] > 0)
