"""Differentiable collectives for the PyTorch frontend (Horovod's ``hvd.allreduce`` & co. carry gradients).

The collectives themselves are :mod:`shoal.core.collectives`; this module only adds autograd: when the
input requires grad, the call runs inside a ``torch.autograd.Function`` whose backward is the adjoint
collective. Without ``requires_grad`` the core function is called directly (no overhead).

Adjoints (n = members of the process set):

=============  ====================================================================
forward        backward
=============  ====================================================================
allreduce      allreduce of the gradient with the same op and scale factors
allgather      Sum-allreduce of the gradient, then this rank's rows
broadcast      Sum-allreduce of the gradient on the root; zeros elsewhere
alltoall       alltoall of the gradient with the received splits
reducescatter  allgather of the gradient (times the forward's scale)
=============  ====================================================================

Arguments are checked by the core, after its exchange, so that a bad argument on one rank fails every
rank at once (constraint 3 of :mod:`shoal.core.collectives`): this module only decides whether the call
needs autograd, and anything that is not a tensor (a list, a numpy array) goes to the core as it is. The
one check made here is about the gradient itself: an op that has none (Min, Max, Product) with an input
that requires grad. The backward of ``allgather`` needs every member's row count: it travels in an int64
tensor (the core's ``allgather``), never as a pickled object.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from shoal.core import collectives as _c
from shoal.core import runtime

__all__ = ["allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "grouped_allgather",
           "grouped_reducescatter"]


def _wants_grad(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled()


def _grad_op(what: str, name: Any, op: Any, average: Optional[bool]) -> Optional[_c.ReduceOp]:
    """The op of a call whose input requires grad; None when the op is not valid at all (the core then
    raises it on every rank, constraint 3 of the core); ValueError when it is valid but has no gradient."""
    try:
        rop = _c.ReduceOp.resolve(op, average, what)
    except (TypeError, ValueError, NotImplementedError):
        return None
    if rop not in (_c.Average, _c.Sum):
        label = f"'{name}'" if isinstance(name, str) else "tensor"
        raise ValueError(f"shoal: {what} of {label} with op={rop.name} has no gradient. "
                         "HINT: use Average or Sum, or detach() the input.")
    return rop


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, prescale, postscale, process_set, name):
        ctx.args = (op, prescale, postscale, process_set)
        return _c.allreduce(tensor, name=name, op=op, prescale_factor=prescale, postscale_factor=postscale,
                            process_set=process_set)

    @staticmethod
    def backward(ctx, grad):
        op, prescale, postscale, process_set = ctx.args
        return (_c.allreduce(grad.contiguous(), op=op, prescale_factor=prescale,
                             postscale_factor=postscale, process_set=process_set),
                None, None, None, None, None)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, process_set, name):
        ctx.process_set = process_set
        out = _c.allgather(tensor, name=name, process_set=process_set)
        # Every member's row count, for the backward's slice: an int64 tensor, never a pickled object.
        rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        ctx.rows = _c.allgather(rows, name=None if name is None else f"{name}.rows",
                                process_set=process_set).tolist()
        return out

    @staticmethod
    def backward(ctx, grad):
        summed = _c.allreduce(grad.contiguous(), op=_c.Sum, process_set=ctx.process_set)
        ps = runtime.get_process_set(ctx.process_set)
        me = ps.rank()
        start = sum(ctx.rows[:me])
        return summed[start:start + ctx.rows[me]], None, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, process_set, name):
        ctx.args = (root_rank, process_set)
        return _c.broadcast(tensor, root_rank, name=name, process_set=process_set)

    @staticmethod
    def backward(ctx, grad):
        root_rank, process_set = ctx.args
        summed = _c.allreduce(grad.contiguous(), op=_c.Sum, process_set=process_set)
        if runtime.rank() != root_rank:
            summed = torch.zeros_like(summed)
        return summed, None, None, None


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, process_set, name):
        ctx.process_set = process_set
        out, received = _c.alltoall(tensor, splits=splits if splits is not None else
                                    _even_splits(tensor, process_set), name=name, process_set=process_set)
        ctx.received = received
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _grad_splits):
        back, _ = _c.alltoall(grad.contiguous(), splits=ctx.received, process_set=ctx.process_set)
        return back, None, None, None


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, prescale, postscale, process_set, name):
        n = runtime.get_process_set(process_set).size()
        scale = prescale * postscale / (n if op == _c.Average else 1)
        ctx.args = (scale, process_set)
        return _c.reducescatter(tensor, name=name, op=op, process_set=process_set,
                                prescale_factor=prescale, postscale_factor=postscale)

    @staticmethod
    def backward(ctx, grad):
        scale, process_set = ctx.args
        return _c.allgather(grad.contiguous(), process_set=process_set) * scale, None, None, None, None, None


def _each_differentiable(tensors: Any, name: Any) -> bool:
    """A grouped call that goes tensor by tensor through autograd: a list or tuple (anything else, and a
    name that is not a str, go to the core, which checks them) with a tensor that requires grad."""
    return (isinstance(tensors, (list, tuple)) and (name is None or isinstance(name, str))
            and any(_wants_grad(t) for t in tensors))


def _even_splits(tensor: torch.Tensor, process_set) -> list[int]:
    n = runtime.get_process_set(process_set).size()
    return [tensor.shape[0] // n] * n


def allreduce(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
              op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set=None) -> torch.Tensor:
    """:func:`shoal.core.collectives.allreduce`, differentiable (Sum/Average) when ``tensor`` requires grad."""
    if _wants_grad(tensor):
        rop = _grad_op("allreduce", name, op, average)
        if rop is not None:
            return _Allreduce.apply(tensor, rop, prescale_factor, postscale_factor, process_set, name)
    return _c.allreduce(tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
                        postscale_factor=postscale_factor, process_set=process_set)


def allgather(tensor: torch.Tensor, name: Optional[str] = None, process_set=None) -> torch.Tensor:
    """:func:`shoal.core.collectives.allgather`, differentiable when ``tensor`` requires grad."""
    if _wants_grad(tensor) and tensor.dim() > 0:
        return _Allgather.apply(tensor, process_set, name)
    return _c.allgather(tensor, name=name, process_set=process_set)


def broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None, process_set=None) -> torch.Tensor:
    """:func:`shoal.core.collectives.broadcast`, differentiable when ``tensor`` requires grad."""
    if _wants_grad(tensor):
        return _Broadcast.apply(tensor, root_rank, process_set, name)
    return _c.broadcast(tensor, root_rank, name=name, process_set=process_set)


def alltoall(tensor: torch.Tensor, splits: Any = None, name: Optional[str] = None, process_set=None):
    """:func:`shoal.core.collectives.alltoall`, differentiable when ``tensor`` requires grad."""
    if _wants_grad(tensor) and tensor.dim() > 0:
        out, received = _Alltoall.apply(tensor, splits, process_set, name)
        return (out, received) if splits is not None else out
    return _c.alltoall(tensor, splits=splits, name=name, process_set=process_set)


def reducescatter(tensor: torch.Tensor, name: Optional[str] = None, op: Any = _c.Average, process_set=None,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> torch.Tensor:
    """:func:`shoal.core.collectives.reducescatter`, differentiable (Sum/Average) when ``tensor`` requires grad."""
    if _wants_grad(tensor):
        # The backward (an allgather times the forward's scale) is the adjoint of a sum only.
        rop = _grad_op("reducescatter", name, op, None)
        if rop is not None:
            return _Reducescatter.apply(tensor, rop, prescale_factor, postscale_factor, process_set, name)
    return _c.reducescatter(tensor, name=name, op=op, process_set=process_set,
                            prescale_factor=prescale_factor, postscale_factor=postscale_factor)


def grouped_allgather(tensors, name: Optional[str] = None, process_set=None) -> list[torch.Tensor]:
    """:func:`shoal.core.collectives.grouped_allgather`, differentiable when a tensor requires grad (then
    one :func:`allgather` per tensor, in order)."""
    if _each_differentiable(tensors, name):
        return [allgather(t, None if name is None else f"{name}.{i}", process_set) for i, t in enumerate(tensors)]
    return _c.grouped_allgather(tensors, name=name, process_set=process_set)


def grouped_reducescatter(tensors, name: Optional[str] = None, op: Any = _c.Average, process_set=None,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """:func:`shoal.core.collectives.grouped_reducescatter`, differentiable (Sum/Average) when a tensor
    requires grad (then one :func:`reducescatter` per tensor, in order)."""
    if _each_differentiable(tensors, name):
        return [reducescatter(t, None if name is None else f"{name}.{i}", op, process_set, prescale_factor,
                              postscale_factor) for i, t in enumerate(tensors)]
    return _c.grouped_reducescatter(tensors, name=name, op=op, process_set=process_set,
                                    prescale_factor=prescale_factor, postscale_factor=postscale_factor)
