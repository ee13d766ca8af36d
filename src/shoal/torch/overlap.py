"""The overlapped optimizer step (``overlap_step``, opt-in): each bucket's parameters are stepped the moment
that bucket is reduced, while later buckets are still on the wire.

It is a reducer observer (:class:`shoal.core.reducer.ReducerObserver`, ``on_done``): the engine tells it
which tensors a reduced bucket completes; it steps the wrapped optimizer over those parameters. It touches
no private of the reducer, the step owner or the optimizer wrapper.

Design constraints:

1. Bitwise one step at the end, or not at all. Stepping parameters in parts equals one step over all of
   them only for optimizers whose update of a parameter reads that parameter, its gradient and its own
   state: the element-wise ``torch.optim`` classes in :data:`OVERLAP_SAFE`, exactly (a subclass may
   override ``step`` with something global, e.g. a norm over all gradients), with no step hooks, no
   closure, and ``nan_check`` off (its decision needs the last bucket). Otherwise the step runs the plain
   way, one step after the last bucket.
2. A parameter this rank produced no gradient for waits for the end: a gradient no rank produced becomes
   ``None`` after the last bucket (the negotiation), and must then not be stepped at all.
3. Off by default: on CPU ranks that share cores the step then competes with gloo's threads (measured
   slower on loopback, docs/engine.md).

What lives elsewhere: the step (:mod:`shoal.torch.optimizer`), the events (:mod:`shoal.core.reducer`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from shoal.core import timeline as _timeline
from shoal.core.reducer import ReducerObserver

__all__ = ["OVERLAP_SAFE", "OverlapStepper", "step_subset"]

#: Optimizers whose update of a parameter reads only that parameter, its gradient and its own state, so
#: that stepping the parameters bucket by bucket equals one step over all of them (constraint 1).
OVERLAP_SAFE = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam", "ASGD", "Rprop")
    if hasattr(torch.optim, name))


def step_subset(optimizer: torch.optim.Optimizer, subsets: Sequence[Sequence[torch.Tensor]]) -> None:
    """``optimizer.step()`` over ``subsets[k]`` of each parameter group ``k`` (their state, groups and
    hyper-parameters as they are); nothing runs when none of them has a gradient."""
    if not any(p.grad is not None for ps in subsets for p in ps):
        return
    groups = optimizer.param_groups
    saved = [g["params"] for g in groups]
    try:
        for g, ps in zip(groups, subsets):
            g["params"] = list(ps)
        optimizer.step()
    finally:
        for g, ps in zip(groups, saved):
            g["params"] = ps


def can_step_in_parts(optimizer: torch.optim.Optimizer, nan_check: str) -> bool:
    """Whether stepping ``optimizer``'s parameters in parts equals one step over all (constraint 1)."""
    if nan_check != "off" or type(optimizer) not in OVERLAP_SAFE:
        return False
    from torch.optim import optimizer as _torch_optimizer  # noqa: PLC0415

    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None),
             getattr(_torch_optimizer, "_global_optimizer_post_hooks", None))
    return not any(hooks)


class OverlapStepper(ReducerObserver):
    """Steps the parameters of each reduced bucket while later buckets are on the wire.

    Args:
        optimizer: the wrapped (inner) optimizer.
        param_of: reducer tensor index -> (parameter, whether this rank produced its gradient this step).

    Use: :meth:`arm` before a step's synchronization (only when :func:`can_step_in_parts`), then
    :meth:`finish` after it, which steps what no bucket stepped and disarms.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 param_of: Callable[[int], tuple[torch.Tensor, bool]]):
        self.optimizer = optimizer
        self._param_of = param_of
        self._stepped: Optional[set[int]] = None
        self._group_of: dict[int, int] = {}

    def arm(self) -> None:
        """Step bucket by bucket in the synchronization that follows."""
        self._stepped = set()
        # Parameter -> its group, once per step: each bucket then steps only its own parameters.
        self._group_of = {id(p): k for k, g in enumerate(self.optimizer.param_groups) for p in g["params"]}

    @property
    def armed(self) -> bool:
        return self._stepped is not None

    def wants(self, event: str) -> bool:
        return event == "on_done" and self._stepped is not None

    def on_done(self, reducer, bucket: int, tensor_ids: list[int]) -> None:
        subsets: list[list[torch.Tensor]] = [[] for _ in self.optimizer.param_groups]
        for t in tensor_ids:
            p, produced = self._param_of(t)
            k = self._group_of.get(id(p))
            if k is not None and produced and p.grad is not None:  # constraint 2
                subsets[k].append(p)
                self._stepped.add(id(p))
        if any(subsets):
            with _timeline.span("optimizer", f"optimizer step b{bucket}", "main",
                                {"bucket": bucket, "tensors": len(tensor_ids)}):
                step_subset(self.optimizer, subsets)

    def finish(self) -> None:
        """Step what no bucket stepped (parameters outside the engine, gradients this rank did not
        produce) and disarm."""
        stepped, self._stepped = self._stepped or set(), None
        with _timeline.span("optimizer", "optimizer step"):
            step_subset(self.optimizer, [[p for p in g["params"] if id(p) not in stepped]
                                         for g in self.optimizer.param_groups])

    def disarm(self) -> None:
        self._stepped = None
