"""Differentiable collectives for the PyTorch frontend (Horovod's ``hvd.allreduce`` & co. carry gradients),
with Horovod's signatures (``compression=`` as the 4th argument of ``allreduce`` and ``grouped_allreduce``,
the 3rd of ``reducescatter`` and ``grouped_reducescatter``).

The collectives themselves are :mod:`shoal.core.collectives`; this module only adds autograd and
``compression=``: when an input requires grad, the call runs inside a ``torch.autograd.Function`` whose
backward is Horovod's; without ``requires_grad`` the core function is called directly (no overhead).

Backward passes follow Horovod's conventions (``horovod/torch/mpi_ops.py``), so that code which
backpropagates through collectives (contrastive losses over gathered embeddings, say) gets Horovod's
numbers (n = members of the process set):

==================  ==============================================================================
forward             backward
==================  ==============================================================================
allreduce           allreduce of the gradient with the same op and scale factors
grouped_allreduce   grouped_allreduce of the gradients with the same op and scale factors
allgather           Average-allreduce of the gradient, then this rank's rows
broadcast           Average-allreduce of the gradient on the root; zeros elsewhere
alltoall            alltoall of the gradient with the received splits
reducescatter       allgather of the gradient, times n for Sum and times the scale factors
==================  ==============================================================================

For allgather and broadcast this is the gradient of the *mean* of the ranks' losses (the exact adjoint,
the gradient of their sum, is n times larger); divide a loss by ``hvd.size()`` and it is the same thing
on both sides.

``compression`` (Horovod's ``Compression.none`` / ``.fp16``, a ``Compressor`` of the user's own, or an
engine compressor such as ``Compression.mixed_fp16``, seen as its 16-bit cast) wraps each tensor:
``compress`` before the collective, ``decompress`` after (:mod:`shoal.torch.compression`).

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

from .compression import Compression, as_pair

__all__ = ["allreduce", "grouped_allreduce", "allgather", "broadcast", "alltoall", "reducescatter",
           "grouped_allgather", "grouped_reducescatter"]


def _wants_grad(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled()


def _grad_op(what: str, name: Any, op: Any, average: Optional[bool]) -> Optional[_c.ReduceOp]:
    """The op of a call whose input requires grad; None when the op is not valid at all (the core then
    raises it on every rank, constraint 3 of the core); ValueError when it is valid but has no gradient."""
    try:
        rop = _c.ReduceOp.resolve(op, average, what)
    except (TypeError, ValueError, NotImplementedError):
        return None
    if rop not in (_c.Average, _c.Sum, _c.Adasum):
        label = f"'{name}'" if isinstance(name, str) else "tensor"
        raise ValueError(f"shoal: {what} of {label} with op={rop.name} has no gradient. "
                         "HINT: use Average or Sum, or detach() the input.")
    return rop


def _compress(pair, tensor):
    """Horovod's ``compress`` of a tensor; anything else passes to the core unchanged (which rejects it)."""
    return pair.compress(tensor) if isinstance(tensor, torch.Tensor) else (tensor, None)


def _decompress(pair, tensor, ctx):
    return pair.decompress(tensor, ctx) if isinstance(tensor, torch.Tensor) else tensor


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
        averaged = _c.allreduce(grad.contiguous(), op=_c.Average, process_set=ctx.process_set)
        ps = runtime.get_process_set(ctx.process_set)
        me = ps.rank()
        start = sum(ctx.rows[:me])
        return averaged[start:start + ctx.rows[me]], None, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, process_set, name):
        ctx.args = (root_rank, process_set)
        return _c.broadcast(tensor, root_rank, name=name, process_set=process_set)

    @staticmethod
    def backward(ctx, grad):
        root_rank, process_set = ctx.args
        averaged = _c.allreduce(grad.contiguous(), op=_c.Average, process_set=process_set)
        if runtime.rank() != root_rank:
            averaged = torch.zeros_like(averaged)
        return averaged, None, None, None


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


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, prescale, postscale, process_set, name, *tensors):
        ctx.args = (op, prescale, postscale, process_set)
        return tuple(_c.grouped_allreduce(list(tensors), name=name, op=op, prescale_factor=prescale,
                                          postscale_factor=postscale, process_set=process_set))

    @staticmethod
    def backward(ctx, *grads):
        op, prescale, postscale, process_set = ctx.args
        reduced = _c.grouped_allreduce([g.contiguous() for g in grads], op=op, prescale_factor=prescale,
                                       postscale_factor=postscale, process_set=process_set)
        return (None, None, None, None, None, *reduced)


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, prescale, postscale, process_set, name):
        n = runtime.get_process_set(process_set).size()
        # Horovod's backward: allgather of the gradient, times n for Sum, times the scale factors.
        scale = prescale * postscale * (n if op == _c.Sum else 1)
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
              compression: Any = Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set=None) -> torch.Tensor:
    """:func:`shoal.core.collectives.allreduce` with Horovod's signature: ``compression`` wraps the tensor;
    differentiable (Sum/Average/Adasum) when ``tensor`` requires grad.

    Example:
        >>> avg = hvd.allreduce(loss.detach(), name="loss")
        >>> total = hvd.allreduce(grad, None, "g", hvd.Compression.fp16, hvd.Sum)   # Horovod's positions
    """
    pair = as_pair(compression, "allreduce")
    wire, ctx = _compress(pair, tensor)
    if _wants_grad(wire):
        rop = _grad_op("allreduce", name, op, average)
        if rop is not None:
            return _decompress(pair, _Allreduce.apply(wire, rop, prescale_factor, postscale_factor, process_set,
                                                      name), ctx)
    out = _c.allreduce(wire, average=average, name=name, op=op, prescale_factor=prescale_factor,
                       postscale_factor=postscale_factor, process_set=process_set)
    return _decompress(pair, out, ctx)


def grouped_allreduce(tensors, average: Optional[bool] = None, name: Optional[str] = None,
                      compression: Any = Compression.none, op: Any = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set=None) -> list[torch.Tensor]:
    """:func:`shoal.core.collectives.grouped_allreduce` with Horovod's signature: ``compression`` wraps each
    tensor; differentiable (Sum/Average/Adasum) when a tensor requires grad (the backward is one grouped
    allreduce of the gradients).

    Example:
        >>> w, b = hvd.grouped_allreduce([w_grad, b_grad], name="layer1", op=hvd.Sum)
    """
    pair = as_pair(compression, "grouped_allreduce")
    if not isinstance(tensors, (list, tuple)):  # the core rejects it on every rank (constraint 3)
        return _c.grouped_allreduce(tensors, average=average, name=name, op=op, prescale_factor=prescale_factor,
                                    postscale_factor=postscale_factor, process_set=process_set)
    pairs = [_compress(pair, t) for t in tensors]
    wires = [w for w, _ in pairs]
    if any(_wants_grad(w) for w in wires) and (name is None or isinstance(name, str)) \
            and all(isinstance(w, torch.Tensor) for w in wires):
        rop = _grad_op("grouped_allreduce", name, op, average)
        if rop is not None:
            out = _GroupedAllreduce.apply(rop, prescale_factor, postscale_factor, process_set, name, *wires)
            return [_decompress(pair, o, c) for o, (_, c) in zip(out, pairs)]
    out = _c.grouped_allreduce(wires, average=average, name=name, op=op, prescale_factor=prescale_factor,
                               postscale_factor=postscale_factor, process_set=process_set)
    return [_decompress(pair, o, c) for o, (_, c) in zip(out, pairs)]


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


def reducescatter(tensor: torch.Tensor, name: Optional[str] = None, compression: Any = Compression.none,
                  op: Any = _c.Average, process_set=None, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """:func:`shoal.core.collectives.reducescatter` with Horovod's signature (``compression`` third),
    differentiable (Sum/Average) when ``tensor`` requires grad."""
    pair = as_pair(compression, "reducescatter")
    wire, ctx = _compress(pair, tensor)
    if _wants_grad(wire):
        rop = _grad_op("reducescatter", name, op, None)
        if rop is not None and rop is not _c.Adasum:  # Adasum: the core refuses it on every rank
            return _decompress(pair, _Reducescatter.apply(wire, rop, prescale_factor, postscale_factor,
                                                          process_set, name), ctx)
    out = _c.reducescatter(wire, name=name, op=op, process_set=process_set, prescale_factor=prescale_factor,
                           postscale_factor=postscale_factor)
    return _decompress(pair, out, ctx)


def grouped_allgather(tensors, name: Optional[str] = None, process_set=None) -> list[torch.Tensor]:
    """:func:`shoal.core.collectives.grouped_allgather`, differentiable when a tensor requires grad (then
    one :func:`allgather` per tensor, in order)."""
    if _each_differentiable(tensors, name):
        return [allgather(t, None if name is None else f"{name}.{i}", process_set) for i, t in enumerate(tensors)]
    return _c.grouped_allgather(tensors, name=name, process_set=process_set)


def grouped_reducescatter(tensors, name: Optional[str] = None, compression: Any = Compression.none,
                          op: Any = _c.Average, process_set=None, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """:func:`shoal.core.collectives.grouped_reducescatter` with Horovod's signature (``compression``
    third), differentiable (Sum/Average) when a tensor requires grad (then one :func:`reducescatter` per
    tensor, in order)."""
    if _each_differentiable(tensors, name):
        return [reducescatter(t, None if name is None else f"{name}.{i}", compression, op, process_set,
                              prescale_factor, postscale_factor) for i, t in enumerate(tensors)]
    pair = as_pair(compression, "grouped_reducescatter")
    if not isinstance(tensors, (list, tuple)):
        return _c.grouped_reducescatter(tensors, name=name, op=op, process_set=process_set,
                                        prescale_factor=prescale_factor, postscale_factor=postscale_factor)
    pairs = [_compress(pair, t) for t in tensors]
    out = _c.grouped_reducescatter([w for w, _ in pairs], name=name, op=op, process_set=process_set,
                                   prescale_factor=prescale_factor, postscale_factor=postscale_factor)
    return [_decompress(pair, o, c) for o, (_, c) in zip(out, pairs)]
