"""NaN drill-down: after the gradient check tripped, name the first *module* that produced the values.

The engine's check (:mod:`shoal.core.checks`) names the gradients, ranks and step. This module goes one
level further on the offending rank: which module's forward output, or which module's output gradient in
backward, was non-finite first.

Design constraints:

1. Nothing is armed until asked. ``torch.autograd.detect_anomaly`` checks every autograd node every step;
   here the hooks exist only inside :func:`drill_down` (or between :meth:`NanDrilldown.arm` and
   :meth:`~NanDrilldown.disarm`), i.e. after a trip, so a healthy run pays nothing.
2. The replay is local. Only the offending ranks re-run the step, and they must not start a collective
   the others do not: the backward of the replay is ``torch.autograd.grad`` (it fills no ``.grad``, so
   the optimizer's gradient hooks, and their bucket collectives, never fire), and the closure must run
   the local model (``ddp.module``, not the DDP wrapper, whose forward talks to the other ranks).
3. The replay leaves no trace: module buffers (BatchNorm statistics) are restored and the RNG is forked,
   so the offending rank stays identical to the others.
4. Every rank gets the same answer: one ``all_gather_object`` at the end, which every rank joins.

What lives elsewhere: the gradient check itself and the report (:mod:`shoal.core.checks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from shoal.core import runtime
from shoal.core.checks import NonFiniteReport

__all__ = ["ModuleEvent", "DrilldownResult", "NanDrilldown", "drill_down"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModuleEvent:
    """A module whose forward output (or output gradient, in backward) held NaN/Inf."""

    #: Qualified name in the model (``"<model>"`` for the root module).
    module: str
    module_type: str
    #: ``"forward"`` or ``"backward"``.
    phase: str
    #: ``"nan"``, ``"inf"`` or ``"nan+inf"``.
    kind: str
    #: Forward only: whether the module's inputs were already non-finite (then the cause is upstream:
    #: the data, or code outside any module).
    inputs_finite: bool = True

    def describe(self) -> str:
        what = "output" if self.phase == "forward" else "output gradient"
        kind = {"nan": "NaN", "inf": "Inf", "nan+inf": "NaN and Inf"}[self.kind]
        text = f"{self.phase}: {what} of '{self.module}' ({self.module_type}) holds {kind}"
        if not self.inputs_finite:
            text += " but its inputs already did (the cause is upstream of every module: the input data)"
        return text


@dataclass(frozen=True, slots=True)
class DrilldownResult:
    """What the replay on one rank found."""

    rank: int
    #: First module, in execution order, whose forward output was non-finite (None: all finite).
    forward: Optional[ModuleEvent]
    #: First module, in backward order, whose output gradient was non-finite (None: all finite).
    backward: Optional[ModuleEvent]
    #: Whether the closure's return value (the loss) was finite.
    loss_finite: bool

    @property
    def first(self) -> Optional[ModuleEvent]:
        """The module to look at: the first forward event, else the first backward event."""
        return self.forward or self.backward

    def describe(self) -> str:
        if self.forward is not None:
            return f"rank {self.rank}: first non-finite value in {self.forward.describe()}"
        if self.backward is not None:
            where = ("the loss was non-finite while every module output was finite, so it came from the "
                     "loss computation; " if not self.loss_finite else "")
            return f"rank {self.rank}: {where}first non-finite value in {self.backward.describe()}"
        return (f"rank {self.rank}: the replay was finite everywhere (the non-finite values did not "
                "reproduce: data-dependent randomness such as dropout, or a transient)")


def _kind(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    nan = any(bool(torch.isnan(t).any()) for t in tensors)
    inf = any(bool(torch.isinf(t).any()) for t in tensors)
    return "nan+inf" if nan and inf else "nan" if nan else "inf" if inf else None


def _float_tensors(value) -> list[torch.Tensor]:
    """Floating-point tensors in a module's input/output (tensor, tuple, list, dict, nested)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _float_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _float_tensors(v)]
    return []


class NanDrilldown:
    """Forward and backward hooks on every submodule of ``model`` that record the first non-finite
    output and output gradient. Costs nothing until :meth:`arm` (constraint 1).

    Example (arm for the next step after a skipped one)::

        drill = NanDrilldown(model)
        ...
        if opt.nan_report is not None:
            drill.arm()          # the next forward/backward is watched
        ...
        print(drill.forward, drill.backward); drill.disarm()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.forward: Optional[ModuleEvent] = None
        self.backward: Optional[ModuleEvent] = None
        self._handles: list = []

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Register the hooks and forget earlier events."""
        self.disarm()
        self.forward = self.backward = None
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_hook(self._forward_hook(name or "<model>")))

    def disarm(self) -> None:
        """Remove every hook (tensor hooks of outputs die with their graphs)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "NanDrilldown":
        self.arm()
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            outs = _float_tensors(output)
            if self.forward is None:
                kind = _kind(outs)
                if kind is not None:
                    self.forward = ModuleEvent(name, type(module).__name__, "forward", kind,
                                               inputs_finite=_kind(_float_tensors(inputs)) is None)
            for t in outs:
                if t.requires_grad:
                    t.register_hook(self._backward_hook(name, type(module).__name__))
        return hook

    def _backward_hook(self, name: str, module_type: str):
        def hook(grad: torch.Tensor) -> None:
            # Hooks fire in backward order: the first one to see a non-finite gradient wins.
            if self.backward is None:
                kind = _kind([grad])
                if kind is not None:
                    self.backward = ModuleEvent(name, module_type, "backward", kind)
        return hook


def drill_down(model: nn.Module, closure: Callable[[], torch.Tensor],
               report: Optional[NonFiniteReport] = None, *, ranks: Optional[Sequence[int]] = None,
               process_set: Optional[runtime.ProcessSet] = None) -> dict[int, DrilldownResult]:
    """Replay a step on the offending ranks with hooks armed; return what each found, on every rank.

    Collective: every rank of ``process_set`` must call it (after a trip, every rank holds the same
    report, so they all know to). Only the ranks in ``report.ranks`` (or ``ranks``) replay.

    Args:
        model: the local model (for DDP: ``ddp.module``; constraint 2).
        closure: runs the forward of the tripped step on the same batch and returns the loss, e.g.
            ``lambda: loss_fn(model(x), y)``. It must not call ``backward``, an optimizer, or a collective.
        report: the trip's report (``err.report`` or ``optimizer.nan_report``); names the ranks.
        ranks: the ranks to replay on, instead of ``report.ranks``.
        process_set: the ranks taking part (default: all).

    Returns:
        ``{rank: DrilldownResult}`` for every replaying rank, the same on every rank.

    Example:
        >>> try:
        ...     opt.step()
        ... except NonFiniteGradientError as err:
        ...     found = drill_down(model, lambda: F.cross_entropy(model(x), y), err.report)
        ...     print(found[err.report.ranks[0]].describe())
        ...     raise
    """
    ps = runtime.get_process_set(process_set)
    replay_on = set(ranks if ranks is not None else (report.ranks if report is not None else ()))
    mine: Optional[DrilldownResult] = None
    if dist.get_rank() in replay_on:
        mine = _replay(model, closure)
        log.warning("shoal: NaN drill-down: %s", mine.describe())
    everyone: list = [None] * ps.size()
    dist.all_gather_object(everyone, mine, group=ps.group)
    return {r.rank: r for r in everyone if r is not None}


def _replay(model: nn.Module, closure: Callable[[], torch.Tensor]) -> DrilldownResult:
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    params = [p for p in model.parameters() if p.requires_grad]
    drill = NanDrilldown(model)
    devices = [p.device.index for p in params if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices), drill, torch.enable_grad():
            loss = closure()
            loss_finite = bool(torch.isfinite(loss.detach()).all())
            if loss.requires_grad and params:
                # Not loss.backward(): no .grad is written, so no gradient hook (and no collective) fires.
                torch.autograd.grad(loss.sum() if loss.dim() else loss, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
    return DrilldownResult(dist.get_rank(), drill.forward, drill.backward, loss_finite)
