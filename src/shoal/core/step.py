"""The step owner: one object per optimizer owns everything one step of gradient reduction involves, for
every frontend.

A frontend (``shoal.torch``'s ``DistributedOptimizer``, ``shoal.keras``'s, and the next ones) moves
tensors in and out and says when; this module does the rest, once: counting gradient firings, discovering
the ready order in step 1 and agreeing on it, the bucket plan, the reducer and its observers (the
per-step negotiation, the NaN check, the timeline), sparse gradients, the tuner, join's shadow steps, and
one step counter that every one of them reads.

The step's control path reads one way::

    frontend --ready(i, grad)--> StepOwner --load--> GradientReducer --bucket--> algorithm (async)
    frontend --synchronize(local)--> StepOwner --finish--> Negotiator(reducer.finish + bit vector)
                                               --> FiniteCheck.finish_step --> Autotuner.end_step
    frontend <--StepResult(none_have, nan_report, replanned, sparse)-- StepOwner

Design constraints:

1. Step 1 discovers: which tensors get gradients, in which order (the bucket plan follows the real ready
   order, agreed from the process set's first rank, as JSON: nothing a peer sends is unpickled), and
   which gradients are sparse. From step 2 on, buckets go on the wire during backward.
2. One agreement, one counter. The ready order is agreed here for every frontend; ``step`` (completed
   steps) is the only step counter: the negotiator, the reducer, the NaN check and the tuner read it, and
   every message numbers steps from 1.
3. One resolver for per-optimizer options: the runtime config with the optimizer's keywords applied and
   validated (:func:`resolve_settings`): ``fusion_threshold_mb=0`` is an error, not "the default".
4. A gradient's firings are counted here: ``backward_passes_per_step`` backward passes, times the number
   of firings per pass that the negotiator learned (reentrant checkpointing fires some several times),
   make it ready.
5. What a frontend needs back is a :class:`StepResult`; nothing of the engine's internals leaks into the
   frontends (the introspection surface is :class:`EngineInfo`, read-only).
6. One world at a time. The registration check (collective) runs once per world of process groups: where
   the owner is built, or, after ``shutdown()`` / ``init()`` or an elastic change of membership, at the
   first step of the new world, which is where every member is (an elastic worker that joins builds its
   optimizers before it catches up, the survivors long before: so under elastic training every owner
   registers at its first step). A new world starts at step 0 with new buckets.

What lives elsewhere: the buckets and their collectives (:mod:`shoal.core.reducer`), the per-step
agreement (:mod:`shoal.core.negotiation`), the NaN check (:mod:`shoal.core.checks`), the tuner
(:mod:`shoal.core.autotune`), join's rounds (:mod:`shoal.core.join`), autograd hooks and what
``param.grad`` becomes (the frontends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from . import autotune as _autotune
from . import exchange, runtime
from .buckets import TensorSpec, plan_buckets
from .checks import DeferredVerdict, NonFiniteReport, apply_nan_policy, make_finite_check
from .config import ShoalConfig
from .errors import ShoalError
from .join import note_step, register_owner
from .negotiation import Negotiator
from .ops import ReduceOp
from .reducer import GradientReducer, ReducerObserver, TimelineObserver

# torch 2.13 renamed all_gather_into_tensor (the old name warns); earlier versions have the old name only.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = ["StepOwner", "StepResult", "EngineInfo", "resolve_settings", "ENGINE_OPTIONS", "completed_steps",
           "settle_deferred"]

log = logging.getLogger(__name__)

#: Keywords an optimizer wrapper passes through to the engine (per-optimizer overrides of the runtime
#: config); any other keyword is refused when the wrapper is built.
ENGINE_OPTIONS = frozenset({"fusion_threshold_mb", "first_bucket_mb", "num_streams", "hierarchical",
                            "error_feedback", "nan_check", "compression", "negotiation"})


#: Synchronizations completed by every step owner of this process (elastic training compares survivors'
#: counts to decide whether they all finished the same step, shoal.core.elastic).
_completed = 0


def completed_steps() -> int:
    """Synchronizations completed in this process, over every optimizer and world."""
    return _completed


def resolve_settings(options: Mapping[str, Any], what: str = "DistributedOptimizer") -> ShoalConfig:
    """The runtime config with an optimizer's keywords applied, validated (constraint 3).

    Args:
        options: keywords of :data:`ENGINE_OPTIONS`; ``None`` values mean "not given".
        what: the caller's public name, for messages.

    Returns:
        A :class:`~shoal.core.config.ShoalConfig` (the runtime's, for what was not given).

    Raises:
        TypeError: an unknown keyword (the message lists the engine options).
        ValueError: a value out of range or not one of the choices (the message names it).

    Example:
        >>> resolve_settings({"fusion_threshold_mb": 8}).fusion_threshold_mb
        8.0
    """
    unknown = sorted(set(options) - ENGINE_OPTIONS)
    if unknown:
        raise TypeError(f"shoal: {what} got unknown keyword(s) {unknown}. HINT: the engine options are "
                        f"{', '.join(sorted(ENGINE_OPTIONS))}.")
    given = {k: v for k, v in options.items() if v is not None}
    for name in ("fusion_threshold_mb", "first_bucket_mb"):
        if name in given:
            given[name] = float(given[name])
    if "num_streams" in given:
        given["num_streams"] = int(given["num_streams"])
    try:
        return runtime.config().replace(**given).validate()
    except ValueError as exc:
        raise ValueError(f"{exc} (given to {what})") from None


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a frontend needs to know after a step's synchronization.

    Attributes:
        step: the number of the step that ended (1-based).
        none_have: indices of the tensors no rank produced: their gradients become ``None``.
        nan_report: the NaN/Inf report, identical on every rank; None when every gradient was finite (or
            the check is off). Apply the policy with :meth:`apply_nan_policy`.
        replanned: the views moved (a new bucket plan, or the first step's): point the gradients at
            :meth:`StepOwner.view` again.
        sparse: reduced sparse gradients by tensor index (those reduced outside the buckets).
    """

    step: int
    none_have: tuple[int, ...] = ()
    nan_report: Optional[NonFiniteReport] = None
    replanned: bool = False
    sparse: Mapping[int, torch.Tensor] = field(default_factory=dict)

    #: The step's verdict kept on the device (``synchronize(defer_nan=True)`` on a device check): the
    #: frontend guards its optimizer step with ``deferred.found_inf`` and resolves it later
    #: (:class:`shoal.core.checks.DeferredVerdict`); ``nan_report`` is then None.
    deferred: Optional[DeferredVerdict] = None

    def apply_nan_policy(self) -> bool:
        """The NaN policy on this rank (every rank decides alike): raises under ``raise``, True under
        ``skip`` (skip the update), False otherwise."""
        return apply_nan_policy(self.nan_report)


def settle_deferred(verdict: DeferredVerdict, stepped: bool) -> tuple[Optional[NonFiniteReport], bool]:
    """Read a verdict the device kept (:class:`shoal.core.checks.DeferredVerdict`; collective when its step
    tripped, so every rank calls it at the same point) and apply its policy if the frontend stepped on it.

    Args:
        verdict: the verdict of an earlier synchronization (``StepResult.deferred``).
        stepped: the frontend's optimizer step ran for it (guarded by ``verdict.found_inf``, or just now on
            the host); a step AMP's GradScaler skipped itself gets its report and no policy.

    Returns:
        ``(report, skipped)``: the report (None: all finite), and whether the policy was ``skip``.
    Raises:
        NonFiniteGradientError: under ``raise``, naming the step; ``err.deferred`` when the step was
        skipped on the device and the error comes later.
    """
    report = verdict.resolve()
    if report is None or not (verdict.stepped or stepped):
        return report, False
    return report, apply_nan_policy(report, deferred=verdict.stepped)


class StepOwner:
    """Owns one optimizer's gradient reduction: reducer, negotiator, NaN check, tuner and one step counter.

    Creating it is collective over the process set's members (the registration check), after the frontend
    validated its own arguments.

    Args:
        specs: every tensor the frontend may reduce (name, shape, dtype, device), in its index order.
        settings: the resolved settings (:func:`resolve_settings`).
        process_set: the ranks to reduce over (default: all).
        op: ``ReduceOp.Average`` or ``ReduceOp.Sum``.
        prescale / postscale: Horovod's ``gradient_predivide_factor`` split.
        groups: explicit buckets, as lists of tensor indices (Horovod's ``groups=``).
        backward_passes_per_step: backward passes accumulated locally per reduction.
        sparse_as_dense: reduce sparse gradients as dense tensors in the buckets.
        fixed: the engine keywords the user gave (the tuner leaves them alone).
        what: the owner's public name, for messages.
        extra_settings: frontend settings that decide which collectives a step runs (part of the
            registration digest).
        check_every_steps: the negotiation's period in static mode (default: the negotiator's).
        registered_as: the names ranks compare at registration, where they differ from the names in
            messages (Keras numbers layer names per process, so it compares variables by position).

    Example (what a frontend does)::

        owner = StepOwner(specs, settings=resolve_settings(kwargs))
        ... autograd hook of tensor i:  view = owner.ready(i, grad); if view is not None: grad <- view
        result = owner.synchronize(lambda i: current_grad(i))
        if result.replanned: point every gradient at owner.view(i)
        for i in result.none_have: drop gradient i
    """

    def __init__(self, specs: Sequence[TensorSpec], *, settings: ShoalConfig,
                 process_set: Optional[runtime.ProcessSet] = None, op: ReduceOp = ReduceOp.Average,
                 prescale: float = 1.0, postscale: float = 1.0,
                 groups: Optional[Sequence[Sequence[int]]] = None, backward_passes_per_step: int = 1,
                 sparse_as_dense: bool = False, fixed: Iterable[str] = (), what: str = "DistributedOptimizer",
                 extra_settings: Optional[Mapping[str, Any]] = None, check_every_steps: Optional[int] = None,
                 registered_as: Optional[Sequence[str]] = None):
        self.specs = list(specs)
        self.settings = settings
        self._process_set_arg = process_set
        self.process_set = runtime.get_process_set(process_set, what)
        self.op = op
        self.prescale, self.postscale = float(prescale), float(postscale)
        if backward_passes_per_step < 1:
            raise ValueError(f"shoal: backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self.passes = int(backward_passes_per_step)
        self.groups = [list(g) for g in groups] if groups is not None else None
        self.sparse_as_dense = bool(sparse_as_dense)
        self.fixed = frozenset(fixed)
        self.what = what
        self._extra_settings = dict(extra_settings or {})
        self._check_every_steps = check_every_steps
        self._registered_as = list(registered_as) if registered_as is not None else None
        #: Completed steps (synchronizations) in this world: the one step counter (constraint 2).
        self.step = 0
        #: True between a synchronization and the end of the frontend's step (``close()``).
        self.synchronized = False
        self._observers: list[ReducerObserver] = []
        #: The frontend's switch of its overlapped optimizer step, where it offers the tuner one
        #: (:func:`shoal.core.autotune.make_autotuner`); None: the tuner leaves the step alone.
        self.overlap_control: Optional[Callable[[bool], None]] = None
        self.negotiator: Optional[Negotiator] = None
        self._generation: Optional[int] = None  # the world the registration check ran in
        self._reset_for_world()
        if not runtime.elastic():
            self._ensure_registered()  # now: a mismatch is an error where the optimizer is built
        # Elastic training (constraint 6): at the first step of each world, where every member is.

    @property
    def active(self) -> bool:
        """Whether there is anything to do in the current world: a member of a set of several ranks, or a
        scaling op (computed locally, no collective)."""
        ps = self.process_set
        return ps.included() and (ps.size() > 1 or self.prescale * self.postscale != 1.0
                                  or self.op == ReduceOp.Sum)

    def _reset_for_world(self) -> None:
        """Forget everything that belongs to a world of process groups (a new world starts at step 0)."""
        reducer = getattr(self, "_reducer", None)
        if reducer is not None:  # buckets of a failed step may still be pending on the old groups
            runtime.abandon_futures(reducer.pending_futures())
            reducer.abandon_step()
        self._counts = [0] * len(self.specs)
        self._reducer: Optional[GradientReducer] = None
        self._tuner: Optional[_autotune.Autotuner] = None
        self._check = None
        self._dense: list[int] = []       # frontend index of reducer tensor j
        self._slot: dict[int, int] = {}   # frontend index -> reducer tensor j
        self._sparse: set[int] = set()
        self._seen_order: list[int] = []  # step 1's ready order (frontend indices)
        self.negotiator = None
        self.synchronized = False

    def forget_world(self) -> None:
        """Drop everything of the current world (its groups close); the next step registers in the new one."""
        self._reset_for_world()
        self._generation = -1  # stale: the next use registers again

    def _ensure_registered(self) -> None:
        """Run the registration check in the current world, once per world (constraint 6): after
        ``shutdown()`` / ``init()`` or an elastic change of membership, the owner starts over in the new
        world, at step 0, with a new negotiator (collective over the process set's members)."""
        generation = runtime.generation()
        if self._generation == generation:
            return
        if self._generation is not None:  # a new world: start over (constraint 6)
            self._reset_for_world()
            self.step = 0
        self.process_set = runtime.get_process_set(self._process_set_arg, self.what)
        self._generation = generation
        if not self.active:
            return
        kwargs = {} if self._check_every_steps is None else {"check_every_steps": int(self._check_every_steps)}
        names = self._registered_as or [s.name for s in self.specs]
        self.negotiator = Negotiator(
            [(name, tuple(s.shape), s.dtype) for name, s in zip(names, self.specs)], self.process_set,
            what=self.what, mode=self.settings.negotiation, nan_check=self.settings.nan_check,
            settings=self._registration_settings(self._extra_settings), steps=lambda: self.step,
            names=[s.name for s in self.specs], **kwargs)
        register_owner(self)

    def _registration_settings(self, extra: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """What decides which collectives a step runs, as the reducer and the tuner will resolve it: ranks
        must agree on it (shoal.core.negotiation, constraint 6)."""
        cfg = self.settings
        fixed = sorted(_autotune.fixed_by_user(cfg, self.fixed) & {"fusion_threshold_mb", "num_streams"})
        return {"fusion_threshold_mb": cfg.fusion_threshold_mb, "first_bucket_mb": cfg.first_bucket_mb,
                "num_streams": cfg.num_streams, "compression": cfg.compression,
                "hierarchical": cfg.hierarchical,
                "groups": "none" if self.groups is None else repr(self.groups),
                "backward_passes_per_step": self.passes,
                "autotune": ("on" + (f", fixed: {', '.join(fixed)}" if fixed else "")) if cfg.autotune else "off",
                **(extra or {})}

    # ------------------------------------------------------------------------------------- queries
    @property
    def built(self) -> bool:
        """Whether step 1 has ended (the buckets exist)."""
        return self._reducer is not None

    def view(self, i: int) -> Optional[torch.Tensor]:
        """Tensor ``i``'s view into its bucket (where its gradient lives from step 2 on); None before the
        buckets exist, for a sparse tensor, or when inactive."""
        j = self._slot.get(i)
        return None if j is None or self._reducer is None else self._reducer.views[j]

    def produced(self, i: int) -> bool:
        """Whether tensor ``i``'s gradient fired on this rank in the step in progress."""
        return self._counts[i] > 0

    @property
    def pending(self) -> bool:
        """Whether any gradient fired since the last synchronization, in the current world (firings of a
        world that ended, e.g. the step an elastic failure interrupted, do not count)."""
        return self._generation == runtime.generation() and any(self._counts)

    def index_of(self, j: int) -> int:
        """The frontend index of the reducer's tensor ``j`` (observers get reducer indices)."""
        return self._dense[j]

    @property
    def info(self) -> "EngineInfo":
        """The read-only introspection surface (:class:`EngineInfo`)."""
        return EngineInfo(self)

    # ------------------------------------------------------------------------------------- observers
    def offer_overlap(self, switch: Callable[[bool], None]) -> bool:
        """The frontend offers its overlapped optimizer step to the tuner: ``switch(on)`` is then called
        between steps, on every rank alike, to try and choose it (:mod:`shoal.core.autotune`, constraint
        9). Call before the first step, only where the overlapped step is exact. Returns whether the
        tuner took it: not when ``autotune`` is off or the user set ``overlap_step``."""
        cfg = self.settings
        if not cfg.autotune or "overlap_step" in _autotune.fixed_by_user(cfg, self.fixed):
            return False
        self.overlap_control = switch
        return True

    def add_observer(self, observer: ReducerObserver) -> None:
        """Have ``observer`` hear the reducer's events (now, or from when step 1 builds the reducer)."""
        self._observers.append(observer)
        if self._reducer is not None:
            self._reducer.add_observer(observer)

    # ------------------------------------------------------------------------------------- per step
    def ready(self, i: int, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Tensor ``i``'s gradient fired with local value ``tensor`` (constraint 4).

        Returns:
            The view the frontend must point the gradient at (its value was copied in, scaled), or None:
            leave the gradient as it is (not complete yet, step 1, a sparse gradient, or no value).
        """
        self._ensure_registered()
        if self.negotiator is None:
            return None  # nothing to reduce in this world
        self._counts[i] += 1
        count = self._counts[i]
        need = self.passes * self.negotiator.fires(i)  # > 1 per pass: reentrant checkpointing
        if count != need:
            if count > need:  # fired again after it was marked ready (shoal.core.negotiation)
                j = self._slot.get(i)
                bucket = None if self._reducer is None or j is None else self._reducer.bucket_of[j]
                self.negotiator.note_extra_firing(i, count, self.passes, bucket)
            return None
        if self.synchronized:
            # A backward after a synchronization whose optimizer step never ran (AMP's GradScaler skips
            # step() on overflow): as in Horovod, that starts a new step.
            self.synchronized = False
        if self._reducer is None:
            if count == self.passes:
                self._seen_order.append(i)
            return None
        j = self._slot.get(i)
        if j is None or tensor is None:
            return None  # a sparse gradient (reduced in synchronize), or nothing to copy
        return self._reducer.load(j, tensor)

    def synchronize(self, local: Callable[[int], Optional[torch.Tensor]], defer_nan: bool = False) -> StepResult:
        """End the step's reduction: launch what is not on the wire, wait, negotiate, check, tune.

        Args:
            local: tensor index -> its current local gradient (None: none). Read for tensors whose value
                is not in their view yet (step 1, gradients never marked ready, sparse ones).
            defer_nan: the frontend can act on a NaN verdict kept on the device (``StepResult.deferred``;
                :mod:`shoal.core.checks`, constraint 6); a host check still gives ``nan_report``.

        Returns:
            The :class:`StepResult`.
        Raises:
            MismatchError: ranks diverged (named, on every rank).
            RankFailureError / StallError: a peer died, left or never arrived (named).
            ShoalError: a gradient was replaced after it was handed over (see :meth:`_fill_views`).
        """
        global _completed
        self._ensure_registered()
        if self.negotiator is None:  # nothing to reduce in this world (one rank, no scaling)
            self.step += 1
            self.synchronized = True
            return StepResult(step=self.step)
        replanned = False
        if self._reducer is None:
            self._build(local)
            replanned = True
        else:
            self._fill_views(local)
        none_have = self.negotiator.finish(self._reducer, self._counts, sorted(self._sparse))
        sparse = self._reduce_sparse(local) if self._sparse else {}
        verdict = self._check.finish_step(self.step + 1, num_buckets=len(self._reducer.plans),
                                          defer=defer_nan) if self._check is not None else None
        deferred = verdict if isinstance(verdict, DeferredVerdict) else None
        report = None if deferred is not None else verdict
        self.step += 1
        _completed += 1
        note_step(self)
        if self._tuner is not None and self._tuner.end_step():
            replanned = True
        self._counts = [0] * len(self.specs)
        self.synchronized = True
        return StepResult(step=self.step, none_have=tuple(none_have), nan_report=report, replanned=replanned,
                          sparse=sparse, deferred=deferred)

    def close(self) -> None:
        """The frontend's step is over (its optimizer step ran, or was skipped): the next gradient starts a
        new step."""
        self.synchronized = False

    def zero_(self) -> None:
        """Zero every bucket (the frontend's ``zero_grad(set_to_none=False)``) and forget this step's
        firings."""
        if self._reducer is not None and self._generation == runtime.generation():
            if self._reducer.in_flight:
                raise ShoalError("shoal: zero_grad() while gradients are on the wire (after backward, before "
                                 "step()). HINT: step (or synchronize) first.")
            for buf in self._reducer.buffers:
                buf.zero_()
        self._counts = [0] * len(self.specs)

    def reset_counts(self) -> None:
        """Forget this step's firings (the frontend dropped its gradients: ``zero_grad(set_to_none=True)``)."""
        self._counts = [0] * len(self.specs)
        self.synchronized = False

    def shadow_step(self) -> StepResult:
        """One step with no gradient of this rank (inside join): zeros and the "joined" flag."""
        self._ensure_registered()
        if self.pending and not self.synchronized:
            raise ShoalError(f"shoal: join() was called on rank {runtime.rank()} after loss.backward() but "
                             f"before {self.what}.step(). HINT: finish the step (optimizer.step()) before "
                             "join(), or zero the gradients.")
        self.zero_()
        self.synchronized = False
        return self.synchronize(lambda i: None)

    def replan_to_last_order(self) -> bool:
        """Re-plan the buckets for the ready order seen in the last step on the process set's first rank
        (agreed as JSON). For frontends whose first step saw another order than the next ones (Keras' torch
        backend reduces step 1 from the host, later steps from backward hooks). Returns True when the views
        moved."""
        red = self._reducer
        if red is None:
            return False
        order = self._agree_order([self._dense[j] for j in red.last_order], "ready order")
        return red.rebucket([self._slot[i] for i in self._complete_order(order) if i in self._slot])

    # ------------------------------------------------------------------------------------- internals
    def _agree_order(self, order: list[int], what: str, extra: Any = None) -> Any:
        """The process set's first rank's ``order`` (and ``extra``), on every member (constraint 1)."""
        ps = self.process_set
        got = exchange.broadcast_json([order, extra], src=ps.ranks[0], group=ps.group)
        agreed = got[0] if isinstance(got, list) and len(got) == 2 else None
        n = len(self.specs)
        if not isinstance(agreed, list) or any(type(i) is not int or not 0 <= i < n for i in agreed) \
                or len(set(agreed)) != len(agreed):
            raise ShoalError(f"shoal: rank {runtime.rank()} received a malformed {what} from rank {ps.ranks[0]} "
                             f"while building the buckets of {self.what}. HINT: every rank must run the same "
                             "version of Shoal.")
        return agreed if extra is None else (agreed, got[1])

    def _complete_order(self, order: Sequence[int]) -> list[int]:
        seen = set(order)
        return list(order) + [i for i in range(len(self.specs) - 1, -1, -1) if i not in seen]

    def _build(self, local: Callable[[int], Optional[torch.Tensor]]) -> None:
        """End of step 1 (constraint 1): agree on order and sparse set, build the buckets, load the
        gradients into their views."""
        sparse_here = [] if self.sparse_as_dense else sorted(
            i for i in range(len(self.specs)) if (t := local(i)) is not None and t.is_sparse)
        order, sparse = self._agree_order(self._seen_order, "ready order", sparse_here)
        if not isinstance(sparse, list) or any(type(i) is not int or not 0 <= i < len(self.specs)
                                                for i in sparse):
            raise ShoalError(f"shoal: rank {runtime.rank()} received a malformed sparse-gradient list while "
                             f"building the buckets of {self.what}. HINT: every rank must run the same version "
                             "of Shoal.")
        self._sparse = set(sparse)
        full_order = [i for i in self._complete_order(order) if i not in self._sparse]
        self._dense = sorted(full_order)
        self._slot = {i: j for j, i in enumerate(self._dense)}
        specs = [self.specs[i] for i in self._dense]
        groups = None
        if self.groups is not None:
            groups = [[self._slot[i] for i in g if i in self._slot] for g in self.groups]
            groups = [g for g in groups if g]
        cfg = self.settings
        self._check = make_finite_check(cfg.nan_check, self.process_set)
        observers: list[ReducerObserver] = [self.negotiator, TimelineObserver()]
        if self._check is not None:
            observers.insert(1, self._check)
        red = GradientReducer(
            specs, op=self.op, prescale_factor=self.prescale, postscale_factor=self.postscale,
            process_set=self.process_set, fusion_threshold_mb=cfg.fusion_threshold_mb,
            first_bucket_mb=cfg.first_bucket_mb, num_streams=cfg.num_streams, compression=cfg.compression,
            hierarchical=cfg.hierarchical, error_feedback=cfg.error_feedback, groups=groups,
            observers=observers + self._observers, steps=lambda: self.step)
        red.rebucket([self._slot[i] for i in full_order])
        self._reducer = red
        self._tuner = _autotune.make_autotuner(red, self.fixed, steps=lambda: self.step,
                                               overlap=self.overlap_control)
        for j, i in enumerate(self._dense):
            red.load(j, local(i))

    def _fill_views(self, local: Callable[[int], Optional[torch.Tensor]]) -> None:
        """Every gradient's local value in its view before the rest of the buckets go on the wire.

        A gradient that is not its view any more was replaced after backward handed it over (``p.grad =
        ...``); when its bucket had already left (it was marked ready), the new value can no longer be
        reduced: the step fails on every rank, naming the tensor (Horovod's rule: edit gradients after
        ``synchronize()``, then ``step()`` inside ``skip_synchronize()``)."""
        red = self._reducer
        for j, i in enumerate(self._dense):
            view = red.views[j]
            t = local(i)
            if t is None:
                if not red.is_ready(j):
                    view.zero_()
                continue
            if t.layout == torch.strided and t.data_ptr() == view.data_ptr():
                continue
            if red.is_ready(j):
                self.negotiator.note_error(
                    f"the gradient of '{self.specs[i].name}' was replaced on rank {runtime.rank()} after "
                    "backward had handed it to the engine (its bucket may be on the wire already), so the new "
                    "value cannot be reduced. HINT: to clip or edit gradients, call optimizer.synchronize() "
                    "after backward, edit param.grad, then call optimizer.step() inside `with "
                    "optimizer.skip_synchronize():` (docs/robustness.md)")
                continue
            view.copy_(t.to_dense() if t.is_sparse else t)

    def _reduce_sparse(self, local: Callable[[int], Optional[torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Sparse gradients: allgather indices and values (sizes differ per rank), then coalesce. Sizes
        travel as a tensor (no pickle)."""
        group, n = self.process_set.group, self.process_set.size()
        out: dict[int, torch.Tensor] = {}
        for i in sorted(self._sparse):
            spec = self.specs[i]
            g = local(i)
            if g is None:
                g = torch.sparse_coo_tensor(torch.empty((len(spec.shape), 0), dtype=torch.long),
                                            torch.empty((0,) + tuple(spec.shape[1:]), dtype=spec.dtype),
                                            spec.shape)
            g = g.coalesce()
            idx, val = g.indices(), g.values()
            counts_t = torch.zeros(n, dtype=torch.int64)
            _all_gather_single(counts_t, torch.tensor([idx.shape[1]], dtype=torch.int64), group=group)
            counts = counts_t.tolist()
            top = max(counts)
            pad_idx = torch.zeros((idx.shape[0], top), dtype=idx.dtype)
            pad_idx[:, :idx.shape[1]] = idx
            pad_val = torch.zeros((top,) + tuple(val.shape[1:]), dtype=val.dtype)
            pad_val[:val.shape[0]] = val
            all_idx = [torch.empty_like(pad_idx) for _ in range(n)]
            all_val = [torch.empty_like(pad_val) for _ in range(n)]
            dist.all_gather(all_idx, pad_idx, group=group)
            dist.all_gather(all_val, pad_val, group=group)
            idx = torch.cat([t[:, :c] for t, c in zip(all_idx, counts)], dim=1)
            val = torch.cat([t[:c] for t, c in zip(all_val, counts)])
            scale = self.prescale * self.postscale / (n if self.op == ReduceOp.Average else 1)
            out[i] = torch.sparse_coo_tensor(idx, val * scale, spec.shape).coalesce()
        return out

    # ------------------------------------------------------------------------------------- tuning
    def plan_for(self, fusion_threshold_mb: float) -> list[list[str]]:
        """Tensor names per bucket for this bucket size (computed, not applied); empty before step 1."""
        red = self._reducer
        if red is None:
            return []
        plans = plan_buckets(red.specs, red.order, bucket_nbytes=int(fusion_threshold_mb * 1024 * 1024),
                             first_bucket_nbytes=red.first_bucket_nbytes, groups=red.groups)
        return [[red.specs[t].name for t in p.tensor_ids] for p in plans]

    def reconfigure(self, *, fusion_threshold_mb: Optional[float] = None,
                    num_streams: Optional[int] = None) -> bool:
        """Apply a bucket size and/or stream count between steps (every rank, the same step); turns the
        tuner off. Returns True when the views moved (the frontend re-points gradients as they come)."""
        if self._reducer is None:
            raise ShoalError(f"shoal: reconfigure() before the first step of {self.what}: the buckets do not "
                             "exist yet. HINT: call it after the first optimizer step.")
        self._tuner = None
        return self._reducer.reconfigure(
            bucket_nbytes=None if fusion_threshold_mb is None else int(fusion_threshold_mb * 1024 * 1024),
            num_streams=num_streams)

    def start_autotune(self, **schedule: Any) -> None:
        """(Re)start the bucket-size / stream-count tuner with a grid or schedule of its own (keywords of
        :class:`shoal.core.autotune.Autotuner`, e.g. ``sizes_mb=(1, 4), streams=(1, 2)``), from the next
        step. Call on every rank at the same step. Raises ShoalError before step 1 (no buckets yet)."""
        if self._reducer is None:
            raise ShoalError(f"shoal: start_autotune() before the first step of {self.what}: the buckets do "
                             "not exist yet. HINT: call it after the first optimizer step.")
        self._tuner = _autotune.make_autotuner(self._reducer, self.fixed, steps=lambda: self.step,
                                               overlap=self.overlap_control, **schedule)


class EngineInfo:
    """A read-only view of a step owner, for tests, benchmarks and curious users (constraint 5); its only
    controls are the tuner's lever (:meth:`reconfigure`, :meth:`start_autotune`), for experiments.

    Example:
        >>> opt.engine.num_buckets, opt.engine.step, opt.engine.negotiation["static"]
        (3, 10, True)
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: StepOwner):
        self._owner = owner

    @property
    def step(self) -> int:
        """Completed steps (synchronizations)."""
        return self._owner.step

    @property
    def built(self) -> bool:
        """Whether the buckets exist (after step 1)."""
        return self._owner.built

    @property
    def buckets(self) -> list[list[str]]:
        """The bucket plan: per bucket, in launch order, the names of its tensors."""
        red = self._owner._reducer
        return [] if red is None else [red.names_of(b) for b in range(len(red.plans))]

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    @property
    def bucket_nbytes(self) -> list[int]:
        """Bytes of each bucket's tensors (padding included, control slot excluded)."""
        red = self._owner._reducer
        return [] if red is None else [p.nbytes for p in red.plans]

    @property
    def num_streams(self) -> int:
        red = self._owner._reducer
        return self._owner.settings.num_streams if red is None else red.num_streams

    @property
    def views(self) -> tuple[torch.Tensor, ...]:
        """Per tensor index, its view into the buckets (None: sparse, or before step 1)."""
        return tuple(self._owner.view(i) for i in range(len(self._owner.specs)))

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The flat bucket buffers (read them; do not write)."""
        red = self._owner._reducer
        return () if red is None else tuple(red.buffers)

    @property
    def settings(self) -> ShoalConfig:
        """The resolved settings of this optimizer."""
        return self._owner.settings

    @property
    def negotiation(self) -> dict:
        """``mode``, ``static`` (no per-step collective), ``negotiations`` (full ones run so far)."""
        neg = self._owner.negotiator
        if neg is None:
            return {"mode": "off", "static": False, "negotiations": 0}
        return {"mode": neg.mode, "static": neg.static, "negotiations": neg.negotiations}

    @property
    def autotune(self) -> Optional[dict]:
        """The tuner's summary (:meth:`shoal.core.autotune.Autotuner.summary`); None when off or before
        step 1."""
        tuner = self._owner._tuner
        return tuner.summary() if tuner is not None else None

    @property
    def nan_check(self) -> str:
        """The NaN policy in force."""
        return self._owner.settings.nan_check

    @property
    def in_flight(self) -> bool:
        """Whether buckets of an unfinished step are on the wire (False between steps: the step's futures,
        and the wire copies they hold, are let go)."""
        red = self._owner._reducer
        return red is not None and red.in_flight

    @property
    def timings(self) -> dict:
        """Seconds summed over the steps so far: ``negotiation_outside_s`` (the negotiation's time outside
        the buckets' wait), ``nan_check_s`` (checking buckets) and ``nan_combine_s`` (the flag combine at
        each step's end); what each adds to a step, for benchmarks."""
        owner = self._owner
        check = owner._check
        return {"negotiation_outside_s": owner.negotiator.outside_s if owner.negotiator is not None else 0.0,
                "nan_check_s": check.check_s if check is not None else 0.0,
                "nan_combine_s": check.combine_s if check is not None else 0.0}

    def plan_for(self, fusion_threshold_mb: float) -> list[list[str]]:
        """The bucket plan (tensor names per bucket) this optimizer would use with buckets of this size,
        computed, not applied (the tuner's view of which sizes differ for a model). Empty before step 1."""
        return self._owner.plan_for(fusion_threshold_mb)

    def reconfigure(self, *, fusion_threshold_mb: Optional[float] = None,
                    num_streams: Optional[int] = None) -> None:
        """Apply a bucket size and/or stream count now, between steps, on every rank at the same step (the
        lever the tuner pulls; the tuner is turned off). For sweeps in benchmarks and experiments."""
        self._owner.reconfigure(fusion_threshold_mb=fusion_threshold_mb, num_streams=num_streams)

    def start_autotune(self, **schedule: Any) -> None:
        """A control: (re)start the bucket-size / stream-count tuner with a grid or schedule of
        its own (keywords of :class:`shoal.core.autotune.Autotuner`, e.g. ``sizes_mb=(1, 4), streams=(1,
        2)``), from the next step, on every rank at the same step, after the first step."""
        self._owner.start_autotune(**schedule)

    def __repr__(self) -> str:
        return (f"EngineInfo(step={self.step}, buckets={self.num_buckets}, streams={self.num_streams}, "
                f"negotiation={self.negotiation})")
