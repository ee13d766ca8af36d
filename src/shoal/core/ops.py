"""Reduction operations: the one ``ReduceOp`` of Shoal, and how the optimizers read an ``op=`` argument.

Horovod's constants are integers (``hvd.Average == 0``, ``hvd.Sum == 1``, ...); scripts compare and pass
them as such, so :class:`ReduceOp` is an ``IntEnum`` with Horovod's values. The user collectives
(:mod:`shoal.core.collectives`), the gradient engine (:mod:`shoal.core.reducer`, :mod:`shoal.core.step`)
and every frontend use this one enum.

What lives elsewhere: what each op does to a tensor (the collectives and the algorithms).
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product", "gradient_op"]


class ReduceOp(enum.IntEnum):
    """How allreduce/reducescatter combine tensors. Values are Horovod's, so ``hvd.Sum == 1`` still holds."""

    Average = 0
    Sum = 1
    #: Horovod's adaptive summation; not implemented here (raises with a HINT).
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


Average = ReduceOp.Average
Sum = ReduceOp.Sum
Adasum = ReduceOp.Adasum
Min = ReduceOp.Min
Max = ReduceOp.Max
Product = ReduceOp.Product

_GRADIENT_NAMES = {"average": ReduceOp.Average, "avg": ReduceOp.Average, "mean": ReduceOp.Average,
                   "sum": ReduceOp.Sum}


def gradient_op(op: Any, what: str = "DistributedOptimizer") -> ReduceOp:
    """The op an optimizer wrapper reduces gradients with: ``Average`` (default, ``None``) or ``Sum``.

    Accepts Horovod's constants (this enum), their names as strings (any case), enums with such a
    ``name`` (e.g. torch's ``ReduceOp.SUM`` / ``AVG``, or another framework's), so that a script written
    for Horovod, torch or Keras means what it says.

    Raises:
        ValueError: any other op, naming it (a gradient is averaged or summed; Min/Max/Product of
            gradients is not training).

    Example:
        >>> gradient_op(None), gradient_op("sum"), gradient_op(Sum)
        (<ReduceOp.Average: 0>, <ReduceOp.Sum: 1>, <ReduceOp.Sum: 1>)
    """
    if op is None:
        return ReduceOp.Average
    if isinstance(op, ReduceOp):
        if op in (ReduceOp.Average, ReduceOp.Sum):
            return op
    else:
        name = str(getattr(op, "name", op)).rsplit(".", 1)[-1].lower()
        if name in _GRADIENT_NAMES:
            return _GRADIENT_NAMES[name]
    raise ValueError(f"shoal: {what} supports op=Average or Sum, got {op!r}. HINT: gradients are averaged "
                     "(op=hvd.Average, the default) or summed (op=hvd.Sum).")
