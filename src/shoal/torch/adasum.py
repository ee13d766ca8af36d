"""Horovod's Adasum optimizer: ``hvd.DistributedOptimizer(opt, op=hvd.Adasum)``.

Horovod's ``DistributedOptimizer`` with ``op=Adasum`` is a different optimizer (``_DistributedAdasumOptimizer``
in ``horovod/torch/optimizer.py``): each rank takes its own optimizer step, and the ranks combine the
*changes* of the parameters (the deltas) with Adasum, not the gradients. For plain SGD the two are the same
(Adasum is scale invariant: ``adasum(c a, c b) = c adasum(a, b)``); with momentum or Adam the delta is what
Horovod combines, so that is what this does, for scripts that reproduce Horovod's Adasum results (its
examples' ``--use-adasum``: no learning-rate scaling by the number of ranks).

Design constraints:

1. Horovod's semantics: ``start = p``; the wrapped optimizer's step; ``delta = p - start``; ``p = start +
   adasum(delta over ranks)``, tensor by tensor (Adasum's dot products are per tensor).
2. One collective per step: every parameter's delta goes into one ``grouped_allreduce(op=Adasum)`` (one flat
   buffer per dtype, the algorithm combines each tensor on its own: :mod:`shoal.core.algorithms.adasum`),
   with the same tensor list on every rank (a parameter without a gradient has a zero delta), so the
   signature check of the user collectives compares it and a joined rank answers it with zeros
   (``adasum(a, 0) = a``).
3. The same façade as :class:`~shoal.torch.optimizer.DistributedOptimizer` (it is a subclass, so
   ``isinstance`` holds): shared ``param_groups`` and ``state``, ``state_dict``, ``zero_grad``.
   ``synchronize()`` does nothing and ``skip_synchronize()`` raises, as in Horovod: the combination needs
   the step.

What lives elsewhere: the algorithm (:mod:`shoal.core.algorithms.adasum`), the collective
(:func:`shoal.core.collectives.grouped_allreduce`), the gradient engine that every other op uses
(:mod:`shoal.torch.optimizer`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from shoal.core import collectives, runtime
from shoal.core.errors import ShoalError
from shoal.core.ops import ReduceOp

from .compression import Compression, as_pair
from .optimizer import DistributedOptimizer

__all__ = ["AdasumOptimizer"]

#: Keywords of DistributedOptimizer that Horovod's Adasum optimizer ignores (it has no buckets).
_IGNORED = ("groups", "sparse_as_dense", "num_groups")


class AdasumOptimizer(DistributedOptimizer):
    """What ``hvd.DistributedOptimizer(optimizer, op=hvd.Adasum)`` returns (see the module docstring).

    Args:
        optimizer, named_parameters, compression, backward_passes_per_step, process_set: as
            :class:`~shoal.torch.optimizer.DistributedOptimizer`; ``compression`` wraps each delta
            (Horovod's ``compress`` / ``decompress``).
        gradient_predivide_factor: must be 1.0 (Horovod refuses it with Adasum).

    Raises:
        ValueError: ``gradient_predivide_factor`` != 1, bad ``named_parameters``.
        TypeError: an engine option (bucket sizes, streams, ...): this optimizer has no buckets.

    Example:
        >>> opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
        ...                                named_parameters=model.named_parameters(), op=hvd.Adasum)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters=None,
                 compression=Compression.none, backward_passes_per_step: int = 1, op=None,
                 gradient_predivide_factor: float = 1.0, groups=None, sparse_as_dense: bool = False,
                 process_set: Optional[runtime.ProcessSet] = None, **engine_options):
        del op, groups, sparse_as_dense  # Adasum by construction; no buckets to group (as in Horovod)
        self._inner = optimizer
        self._init_hooks()
        self._params, self._names = self._name_parameters(named_parameters)
        if gradient_predivide_factor != 1.0:
            raise ValueError("shoal: gradient_predivide_factor needs op=Average (Horovod refuses it with Adasum)")
        unknown = sorted(k for k in engine_options if k not in _IGNORED)
        if unknown:
            raise TypeError(f"shoal: DistributedOptimizer(op=Adasum) has no buckets, streams or checks to "
                            f"configure: {', '.join(unknown)}. HINT: leave them out with op=hvd.Adasum.")
        if backward_passes_per_step < 1:
            raise ValueError(f"shoal: backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.overlap_step = False
        self.skipped_steps = 0
        self._process_set = runtime.get_process_set(process_set, "DistributedOptimizer")
        self._compression = as_pair(compression, "DistributedOptimizer(op=Adasum)")
        self._steps = 0

    @property
    def engine(self):
        """None: the Adasum optimizer does not use the gradient engine (it reduces deltas, constraint 1)."""
        return None

    @property
    def autotune_summary(self) -> Optional[dict]:
        return None

    @property
    def nan_report(self):
        return None

    def synchronize(self) -> None:
        """Nothing to do before the step: the deltas are combined inside :meth:`step` (as in Horovod)."""

    @contextlib.contextmanager
    def skip_synchronize(self):
        raise ShoalError("shoal: skip_synchronize() is not supported by the Adasum optimizer (as in "
                               "Horovod): it combines each step's parameter changes, so the step itself must "
                               "run. HINT: clip gradients before step(), without synchronize().")
        yield  # pragma: no cover

    def set_backward_passes_per_step(self, passes: int) -> None:
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"shoal: set_backward_passes_per_step({passes!r}): passes must be an int >= 1")
        self.backward_passes_per_step = passes

    def step(self, closure=None):
        """The wrapped optimizer's step on every rank, then ``p = start + adasum(p - start)`` (constraint 1)."""
        loss = closure() if closure is not None else None
        params = self._params
        with torch.no_grad():
            starts = [p.detach().clone() for p in params]
        self._inner.step()
        if self._process_set.size() == 1 or not params:
            return loss
        with torch.no_grad():
            deltas = [p.detach() - s for p, s in zip(params, starts)]
            wires = [self._compression.compress(d) for d in deltas]
            self._steps += 1
            combined = collectives.grouped_allreduce([w for w, _ in wires], op=ReduceOp.Adasum,
                                                     name="AdasumOptimizer.delta", process_set=self._process_set)
            for p, s, out, (_, ctx) in zip(params, starts, combined, wires):
                p.copy_(s + self._compression.decompress(out, ctx).to(p.dtype))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._inner!r}, op=Adasum)"

