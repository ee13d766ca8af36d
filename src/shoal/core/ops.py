"""Reduction operations: the one ``ReduceOp`` of Shoal, and what an ``op=`` argument means.

Horovod's constants are integers (``hvd.Average == 0``, ``hvd.Sum == 1``, ...); scripts compare and pass
them as such, so :class:`ReduceOp` is an ``IntEnum`` with Horovod's values. torch.distributed's ops are
accepted too, with torch's meaning: they are recognized by type, never converted by value (torch's SUM is
0, Horovod's Average). The user collectives (:mod:`shoal.core.collectives`), the gradient engine
(:mod:`shoal.core.reducer`, :mod:`shoal.core.step`) and every frontend use this one enum and
:func:`resolve_op` / :func:`gradient_op`.

What lives elsewhere: what each op does to a tensor (the collectives and the algorithms).
"""

from __future__ import annotations

import enum
import numbers
import warnings
from typing import Any, Optional

import torch.distributed as dist

__all__ = ["ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product", "resolve_op", "gradient_op"]


class ReduceOp(enum.IntEnum):
    """How allreduce/reducescatter combine tensors. Values are Horovod's, so ``hvd.Sum == 1`` still holds.

    Wherever an op is taken, ``torch.distributed.ReduceOp.SUM`` / ``AVG`` / ``MIN`` / ``MAX`` / ``PRODUCT``
    work too, with their torch meaning.
    """

    Average = 0
    Sum = 1
    #: Horovod's adaptive summation (allreduce of floating-point tensors; :mod:`shoal.core.algorithms.adasum`).
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5

    @classmethod
    def resolve(cls, op: Any, average: Optional[bool] = None, what: str = "allreduce") -> "ReduceOp":
        """The op that a collective's ``op=`` (and Horovod's deprecated ``average=``) means
        (:func:`resolve_op`).

        Example:
            >>> ReduceOp.resolve(torch.distributed.ReduceOp.SUM)
            <ReduceOp.Sum: 1>
        """
        return resolve_op(op, average, what)


Average = ReduceOp.Average
Sum = ReduceOp.Sum
Adasum = ReduceOp.Adasum
Min = ReduceOp.Min
Max = ReduceOp.Max
Product = ReduceOp.Product

#: torch.distributed's ops that mean one of ours, by name: their integer values are not Horovod's (torch's
#: SUM is 0, Horovod's Average), so they are recognized by type and never converted by value.
_FROM_TORCH = {"SUM": ReduceOp.Sum, "AVG": ReduceOp.Average, "MIN": ReduceOp.Min, "MAX": ReduceOp.Max,
               "PRODUCT": ReduceOp.Product}

_OPS_HINT = ("use hvd.Average, hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max or hvd.Product, or "
             "torch.distributed.ReduceOp.SUM, AVG, MIN, MAX or PRODUCT.")


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _a(value: Any) -> str:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return ("an " if name[0] in "aeiou" else "a ") + name


def resolve_op(op: Any, average: Optional[bool] = None, what: str = "allreduce") -> ReduceOp:
    """``op`` (and Horovod's deprecated ``average``) as one of our ops.

    Args:
        op: one of ours, its integer value (Horovod's), a torch.distributed op, or None (Average).
        average: Horovod's deprecated flag (True = Average, False = Sum); not with ``op``.
        what: names the call in errors.

    Raises:
        ValueError: both given; an integer that is no op; a torch op Shoal cannot honour (BAND, BOR, BXOR,
            PREMUL_SUM).
        TypeError: something that is not an op (a string, a float, ...): Horovod's ops are constants.
    """
    if op is not None and average is not None:
        raise ValueError(f"shoal: {what}: pass op= or the deprecated average=, not both. HINT: use "
                         "op=hvd.Average or op=hvd.Sum.")
    if op is None:
        if average is not None:
            warnings.warn("average= is deprecated (as in Horovod); use op=Average or op=Sum",
                          DeprecationWarning, stacklevel=4)
        return ReduceOp.Average if average is None or average else ReduceOp.Sum
    if isinstance(op, ReduceOp):
        resolved = op
    elif isinstance(op, (dist.ReduceOp.RedOpType, dist.ReduceOp)):
        # RedOpType first: torch makes isinstance(ReduceOp.SUM, ReduceOp) true, but only a ReduceOp
        # instance (ReduceOp(ReduceOp.SUM), a PREMUL_SUM) has .op.
        kind = op if isinstance(op, dist.ReduceOp.RedOpType) else op.op
        found = _FROM_TORCH.get(kind.name)
        if found is None:
            if kind.name == "PREMUL_SUM":
                hint = "pass the factor as prescale_factor= with op=hvd.Sum (the same sum)."
            else:  # BAND, BOR, BXOR: NCCL has no bitwise reduction, so no backend-independent one here
                hint = ("on 0/1 flags hvd.Min is a logical and and hvd.Max a logical or; for other bit "
                        "patterns call torch.distributed.all_reduce yourself.")
            raise ValueError(f"shoal: {what}: op=torch.distributed.ReduceOp.{kind.name} is not supported "
                             f"(Shoal reduces with Average, Sum, Min, Max and Product). HINT: {hint}")
        resolved = found
    elif isinstance(op, numbers.Integral) and not isinstance(op, bool):
        try:
            resolved = ReduceOp(int(op))
        except ValueError:
            raise ValueError(f"shoal: {what}: unknown reduce op {op!r} (Horovod's ops are 0-5). "
                             f"HINT: {_OPS_HINT}") from None
    else:
        extra = (" Horovod's ops are constants, not names (hvd.ReduceOp['Sum'] looks one up by name)."
                 if isinstance(op, str) else "")
        raise TypeError(f"shoal: {what}: op={_brief(op)} is {_a(op)}, not a reduce op.{extra} "
                        f"HINT: {_OPS_HINT}")
    return resolved


_GRADIENT_NAMES = {"average": ReduceOp.Average, "avg": ReduceOp.Average, "mean": ReduceOp.Average,
                   "sum": ReduceOp.Sum}


def gradient_op(op: Any, what: str = "DistributedOptimizer") -> ReduceOp:
    """The op an optimizer wrapper reduces gradients with: ``Average`` (default, ``None``) or ``Sum``.

    Accepts what :func:`resolve_op` accepts (Horovod's constants and their integer values, torch's ops),
    and, as optimizer wrappers always have, the names as strings (any case).

    Raises:
        ValueError: any other op, naming it (a gradient is averaged or summed; Min/Max/Product of
            gradients is not training).

    Example:
        >>> gradient_op(None), gradient_op("sum"), gradient_op(Sum)
        (<ReduceOp.Average: 0>, <ReduceOp.Sum: 1>, <ReduceOp.Sum: 1>)
    """
    if isinstance(op, str):
        resolved = _GRADIENT_NAMES.get(op.lower())
    else:
        try:
            resolved = resolve_op(op, None, what)
        except (TypeError, ValueError, NotImplementedError):
            resolved = None
    if resolved not in (ReduceOp.Average, ReduceOp.Sum):
        raise ValueError(f"shoal: {what} supports op=Average or Sum, got {op!r}. HINT: gradients are averaged "
                         "(op=hvd.Average, the default) or summed (op=hvd.Sum).")
    return resolved
