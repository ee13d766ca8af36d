"""The NaN/Inf check of gradients: which parameter, on which rank, at which step went non-finite.

Once a bucket has been allreduced, one rank's NaN is on every rank and nobody can tell where it started.
So the check runs on each rank's *local* gradients, right before a bucket goes on the wire, and only the
verdicts travel. This module owns the engine side, for every frontend (the reducer behind
``DistributedOptimizer``, the DDP comm hook, later Keras): the per-bucket check, the combine across ranks,
the attribution to parameters, the :class:`NonFiniteReport` and the policies (:func:`apply_nan_policy`).

Design constraints:

1. One pass over the bucket, no host sync on the hot path. On the CPU the check is ``buffer.sum()``: a sum
   is non-finite iff the bucket holds a NaN or an Inf, or the finite values overflow it (|sum| > 3.4e38,
   a false alarm: 16-bit buckets are summed in float32 so that they cannot overflow it, and a false alarm
   is caught by the exact scan of constraint 3). Measured on a 25 MB fp32 bucket, 1 thread, on a quiet
   16-core Xeon: ``sum`` 1.08 ms (the postscale ``mul_`` that already runs: 1.18 ms), ``isfinite(b).all()``
   25.7 ms (it materialises a 6.5 M-element bool tensor), ``isnan(b).any()`` 9.9 ms; on this 2-core
   machine under load 12 the same ratios (sum 12.9 ms, isfinite-all 130 ms). Reading the sum back costs
   nothing on the CPU (the op is synchronous). Under a reducer, a gradient of at least ``LOAD_PART`` (1 M)
   elements is summed part by part as the reducer scales each 4 MB part into its bucket, while the part is
   in the cache (``shoal.core.reducer``, constraint 8); the other gradients of a bucket are summed at
   launch, one sum per run of neighbours. A 64 MB gradient, one thread, interleaved, load 4 on this
   machine: scaled into its bucket 7.47 ms; summed whole afterwards +3.33 ms; scaled and summed in parts
   +2.39 ms (0.49 of it the scaling in parts). Summing 4 MB from the cache: ``sum`` 87-105 us, ``amax``
   116, ``aminmax`` 167, ``dot`` with ones 315; 512 KB parts (the L2) lost more to per-op overhead than
   they gained. The benchmark models: mlp_big's check time 27-39% lower than whole-bucket sums in the same
   rounds, about 2% of a step (docs/nan_check.md); a pass that scales and checks at once exists only in
   place (``_amp_foreach_non_finite_check_and_unscale_``), and a fresh gradient must be copied anyway.
   On CUDA, reading a sum back would stall the host behind backward's kernels, so the check stays on the
   device: one fused multi-tensor ``_foreach_norm(ord=inf)`` (max |x| per tensor: never overflows, NaN
   stays NaN, checked on an H200 for fp32/fp16/bf16/fp64) per bucket, combined on the device
   (constraints 2 and 6). Checking 6 buckets of 28 MB took 0.74 ms of
   host time while the GPU stayed busy for 625 ms more: no sync on the hot path.
2. One tiny collective per step, after the step's buckets: an allreduce (sum) of one int32 per bucket,
   "how many ranks found a non-finite value in bucket b". Its size does not grow with the world; which
   ranks, which tensors, NaN or Inf travel only when something tripped (constraint 4). It starts
   asynchronously as soon as the last bucket is checked, so it travels beside the last bucket instead of
   after it: waited for after the buckets, it cost 4-8 ms a step on this loaded 2-core machine (the wait
   for the peer to be scheduled, not the bytes); started early, 0.05 ms. On the CPU the host reads it
   after the buckets. On CUDA reading it would be a host sync per step (GradScaler makes that one): on an
   H200 with the small benchmark models (2-40 ms steps) that sync, which stops the host from running
   ahead, cost 13-62% of a step. So the verdict stays on the device where the frontend can act on it
   there (constraint 6).
3. Attribution uses the local values *before* the bucket leaves the rank (afterwards every rank holds the
   polluted sum). On the CPU, a rank whose bucket sum is non-finite scans that bucket's tensors at once
   (``isnan``/``isinf`` counts per tensor: slow, but only on this rare path). On CUDA the per-tensor
   maxima of constraint 1 already say which tensor and NaN vs Inf (no counts).
4. Every rank takes the same path. The combined flags are identical everywhere, so when anything
   tripped every rank joins one ``all_gather_object`` of the findings, builds the same report and applies
   the same policy: all raise, all skip, or all warn. No rank can be left waiting in a collective. The
   policy itself is agreed when the frontend registers (``shoal.core.negotiation.check_registration``
   folds it into the registration digest): a rank without the check would never start the flag
   allreduce its peers wait in, so different policies are a named error there, not a hang.
5. Report order is backward order: bucket plans follow the order gradients became ready, so
   (bucket, position) sorts the earliest-reached parameters first.
6. A verdict checked on the device is not read on the host in its step (``finish_step(defer=True)``
   returns a :class:`DeferredVerdict`): the combined flags give ``found_inf`` on the device, which torch's
   fused optimizers take to skip their step on the device (the GradScaler hand-over, ``optimizer.found_inf``;
   ``shoal.torch.optimizer`` says which optimizers and what the others do). The host reads it later, at
   :meth:`DeferredVerdict.resolve`, and the policy (raise, skip count, warn log) applies then. Lockstep:
   when the step tripped, resolving is collective (constraint 4's ``all_gather``), so every member must
   resolve at the same point of its collective order. The frontend resolves at the first of: the next
   step's start (``zero_grad``, its first gradient, ``synchronize``: after the tripped step's collectives,
   before any of the next step's), or a read of the report, which is then collective and must be made on
   every rank (as the documented pattern does). :meth:`DeferredVerdict.tripped` alone (is there anything,
   for ``skipped_steps``) reads the combined flags, identical on every rank, with no collective, so it may
   run on any subset of ranks. A world that ended (elastic) drops its verdicts: their group is gone.

What lives elsewhere: when the check runs (:class:`shoal.core.reducer.GradientReducer` calls
:meth:`FiniteCheck.check_bucket` before the algorithm, and :meth:`FiniteCheck.finish_step` after
``finish``), what "skip" means for an optimizer and when a deferred verdict is resolved
(``shoal.torch.optimizer``, its constraint 7), the module-level drill-down
(``shoal.torch.nan_drilldown``: it needs torch.nn, which the engine does not import).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import exchange, runtime
from . import timeline as _timeline
from .config import NAN_POLICIES
from .errors import ShoalError
from .reducer import LOAD_PART, ReducerObserver

__all__ = [
    "NAN_POLICIES",
    "NonFiniteTensor",
    "NonFiniteReport",
    "NonFiniteGradientError",
    "FiniteCheck",
    "DeferredVerdict",
    "make_finite_check",
    "apply_nan_policy",
]

log = logging.getLogger(__name__)


#: ``(name, view)`` of every tensor of a bucket, in bucket order; called only when it is needed.
TensorsOf = Callable[[], Sequence[tuple[str, torch.Tensor]]]


@dataclass(frozen=True, slots=True)
class NonFiniteTensor:
    """One gradient that held a NaN or an Inf on one rank before communication."""

    name: str
    #: The global (world) rank, also when the check runs on a process set that is not the world.
    rank: int
    #: ``"nan"``, ``"inf"`` or ``"nan+inf"``.
    kind: str
    bucket: int
    #: Position inside the bucket (bucket, position) is the backward order.
    position: int
    numel: int
    #: Exact counts where the check counted (CPU); None where only the kind is known (CUDA).
    nan_count: Optional[int] = None
    inf_count: Optional[int] = None

    def describe(self) -> str:
        if self.nan_count is None:
            return f"'{self.name}' ({self.kind.replace('+', ' and ')}, rank {self.rank})"
        parts = [f"{c} NaN" for c in (self.nan_count,) if c] + [f"{c} Inf" for c in (self.inf_count,) if c]
        return f"'{self.name}' ({' and '.join(parts)} of {self.numel} values, rank {self.rank})"


@dataclass(frozen=True, slots=True)
class NonFiniteReport:
    """What tripped in one step; identical on every rank of the process set.

    Attributes:
        step: the 1-based number of the step (synchronization) in which the values appeared.
        tensors: one entry per (gradient, rank), earliest in backward order first, then by rank.
        ranks: the global (world) ranks where a gradient was non-finite before communication, also on a
            process set that is not the world ("rank r" in messages is always a world rank).
        policy: the policy that was in force (``raise``, ``skip`` or ``warn``).
    """

    step: int
    tensors: tuple[NonFiniteTensor, ...]
    ranks: tuple[int, ...]
    policy: str

    @property
    def names(self) -> list[str]:
        """Names of the non-finite gradients, earliest in backward order first, each once."""
        seen: dict[str, None] = {}
        for t in self.tensors:
            seen.setdefault(t.name, None)
        return list(seen)

    @property
    def kinds(self) -> set[str]:
        """``{"nan"}``, ``{"inf"}``, or both: what was found, over all tensors and ranks."""
        return {k for t in self.tensors for k in t.kind.split("+")}

    def describe(self, max_tensors: int = 4) -> str:
        """One paragraph for logs and errors (the same text on every rank)."""
        shown = ", ".join(t.describe() for t in self.tensors[:max_tensors])
        more = len(self.tensors) - max_tensors
        what = " and ".join({"nan": "NaN", "inf": "Inf"}[k] for k in sorted(self.kinds))
        ranks = ", ".join(str(r) for r in self.ranks)
        return (f"shoal: non-finite gradients ({what}) at step {self.step}, before the allreduce, on "
                f"rank{'s' if len(self.ranks) > 1 else ''} {ranks}: {shown}"
                + (f" and {more} more" if more > 0 else "")
                + " (in backward order: the first names are the first gradients backward reached).")


class NonFiniteGradientError(ShoalError):
    """A gradient held NaN/Inf before communication under ``nan_check="raise"``; raised on every rank
    with the same message. ``err.report`` is the :class:`NonFiniteReport`."""

    def __init__(self, report: NonFiniteReport, deferred: bool = False):
        self.report = report
        self.culprit_ranks = tuple(report.ranks)
        #: Raised at the start of a later step (the device kept the verdict, constraint 6), not in the step.
        self.deferred = deferred
        when = (f" The weights were not updated by step {report.step} (its optimizer step was skipped on the "
                f"device); raised now, after step {report.step}, because the verdict stayed on the device "
                "(no host sync per step; docs/nan_check.md)." if deferred else
                f" The weights were not updated by step {report.step}.")
        super().__init__(
            report.describe() + when + " HINT: with PyTorch, call shoal.torch.nan_drilldown.drill_down(model, "
            "closure, err.report) on every rank to name the first module that produced it; nan_check='skip' "
            "skips such steps on every rank instead (SHOAL_NAN_CHECK / --nan-check or the optimizer's "
            "nan_check= argument); fp16 overflow belongs to a loss scaler (torch's GradScaler, Keras' "
            "LossScaleOptimizer).")


# ------------------------------------------------------------------------------------------- the check

class FiniteCheck(ReducerObserver):
    """Per-step finite check of a fixed sequence of buckets (one object per step owner or DDP hook).

    Under a step owner it is one of the reducer's observers (:class:`shoal.core.reducer.ReducerObserver`:
    :meth:`before_launch`); the DDP hook calls :meth:`check_bucket` itself.

    Args:
        policy: ``raise``, ``skip`` or ``warn`` (``off`` builds no check: see :func:`make_finite_check`).
        process_set: the ranks that reduce these buckets; the flags are combined over its group.

    Example (what the reducer does)::

        check = make_finite_check("raise", process_set)
        check.check_bucket(b, buffer, lambda: [(name, view), ...])    # per bucket, before the algorithm
        report = check.finish_step(step)                              # after every bucket is reduced
        apply_nan_policy(report)                                       # raise / warn / True = skip
    """

    #: Whether a step's verdict may stay on the device (constraint 6). None (default): where the check ran
    #: on the device. True: CPU tensors too, checked the device way (per-tensor maxima, no counts): how the
    #: tests run the CUDA path's logic on gloo. False: never (the host reads every verdict in the step).
    #: Set it on every rank alike, before the first step.
    defer: Optional[bool] = None

    def __init__(self, policy: str, process_set: runtime.ProcessSet):
        if policy not in NAN_POLICIES or policy == "off":
            raise ValueError(f"shoal: nan_check={policy!r} is not one of raise, skip, warn (off: no check)")
        self.policy = policy
        self.process_set = process_set
        #: Steps finished by this check (the step owner passes its own count instead).
        self.steps = 0
        #: Seconds spent checking buckets and finishing steps (the flag combine), summed: what it costs.
        self.check_s = 0.0
        self.combine_s = 0.0
        self._reset()

    def _reset(self) -> None:
        # Host path under a reducer (constraint 1): bucket -> the sums of its tensors' parts, taken while
        # each part was in the cache (on_loaded), and the tensors they cover.
        self._part_sums: dict[int, list[torch.Tensor]] = {}
        self._loaded: set[int] = set()
        self._num_buckets = 0
        self._combine: Optional[tuple] = None  # (work, flags, local flags) of the flag allreduce
        self._host_tripped: dict[int, list[NonFiniteTensor]] = {}
        # CUDA: bucket -> (per-tensor max |x|, the bucket's tensors) kept on the device until finish_step.
        self._device: dict[int, tuple[torch.Tensor, TensorsOf]] = {}

    # ----------------------------------------------------------------------- hot path, per bucket
    def check_bucket(self, bucket: int, buffer: torch.Tensor, tensors: TensorsOf, last: bool = False) -> None:
        """Check ``buffer`` (bucket ``bucket``, still local) before it goes on the wire.

        Args:
            bucket: index of the bucket in this step's launch order (the same on every rank).
            buffer: the flat bucket.
            tensors: returns ``(name, view)`` of the bucket's tensors in bucket order; called on the CPU
                only when the bucket tripped, on CUDA every step (the views feed one fused kernel).
            last: this is the step's last bucket: start combining the flags (constraint 2).
        """
        start = time.perf_counter()
        self._check(bucket, buffer, tensors)
        if last:
            self.start_combine()
        self.check_s += time.perf_counter() - start

    # Constraint 1: on the host, under a reducer, the gradients of at least LOAD_PART elements are summed
    # part by part as the reducer writes them into their bucket (shoal.core.reducer, constraint 8), while
    # each part is in the cache; at launch, one sum per run of the other (small) gradients, cold.
    _host_path = False
    #: Sum large gradients part by part as they are loaded (True), or every bucket whole at launch.
    cache_parts: bool = True

    def on_buffers(self, reducer, tail) -> None:
        self._host_path = not self.defer and all(b.device.type == "cpu" for b in reducer.buffers)

    def wants(self, event: str) -> bool:
        return event != "on_loaded" or (self._host_path and self.cache_parts)

    def on_loaded(self, reducer, i: int, part: torch.Tensor) -> None:
        """The reducer's event: ``part`` of tensor ``i`` was just written, scaled, and is in the cache."""
        if reducer.views[i].numel() < LOAD_PART or not part.is_floating_point():
            return  # small: summed with its neighbours at launch
        start = time.perf_counter()
        self._part_sums.setdefault(reducer.bucket_of[i], []).append(_sum(part))
        self._loaded.add(i)
        self.check_s += time.perf_counter() - start

    def before_launch(self, reducer, bucket: int, buffer: torch.Tensor, tensors: TensorsOf) -> None:
        """The reducer's event: ``bucket`` is about to leave this rank."""
        tl = _timeline.active()
        start = tl.now_ns() if tl is not None else 0
        sums = self._part_sums.pop(bucket, None)
        last = bucket == len(reducer.plans) - 1
        if sums is not None:
            t0 = time.perf_counter()
            plan, loaded = reducer.plans[bucket], self._loaded
            run = None  # [first offset, end) of a run of tensors not summed yet
            for t, off in zip(plan.tensor_ids, plan.offsets):
                if t in loaded:
                    if run is not None:
                        sums.append(_sum(buffer[run[0]:run[1]]))
                        run = None
                    continue
                end = off + reducer.specs[t].numel
                run = [off, end] if run is None else [run[0], end]
            if run is not None:
                sums.append(_sum(buffer[run[0]:run[1]]))
            self._check_sums(bucket, torch.stack(sums), tensors)
            if last:
                self.start_combine()
            self.check_s += time.perf_counter() - t0
        else:
            self.check_bucket(bucket, buffer, tensors, last=last)
        if tl is not None:
            tl.complete("nan_check", f"nan check b{bucket}", start, tl.now_ns(), "main",
                        {"bucket": bucket, "step": reducer.step_number})

    def _check(self, bucket: int, buffer: torch.Tensor, tensors: TensorsOf) -> None:
        self._num_buckets = max(self._num_buckets, bucket + 1)
        if not (buffer.is_floating_point() or buffer.is_complex()) or buffer.numel() == 0:
            return
        if buffer.device.type == "cpu" and not self.defer:
            # Constraint 1: one pass; 16-bit buckets summed in float32 so that they cannot overflow it.
            self._check_sums(bucket, _sum(buffer), tensors)
            return
        views = [v for _, v in tensors()]
        # Max |x| per tensor: one fused kernel on CUDA, exact (a maximum cannot overflow).
        maxima = torch.stack(torch._foreach_norm(views, float("inf")))
        self._device[bucket] = (maxima, tensors)

    def _check_sums(self, bucket: int, sums: torch.Tensor, tensors: TensorsOf) -> None:
        """Host path: the bucket's sums all finite, or scan it (constraint 3)."""
        self._num_buckets = max(self._num_buckets, bucket + 1)
        if bool(torch.isfinite(sums).all()):
            return
        found = _scan(tensors(), bucket, runtime.rank())
        if found:
            self._host_tripped[bucket] = found
        else:
            log.debug("shoal: bucket %d summed to a non-finite value but holds no NaN/Inf (overflow of the "
                      "sum)", bucket)

    # ----------------------------------------------------------------------- after the step's buckets
    def start_combine(self, num_buckets: Optional[int] = None) -> None:
        """Start the flag allreduce (async). Called by ``check_bucket(..., last=True)``; every member
        must start it at the same point of its collective order."""
        n = max(num_buckets or 0, self._num_buckets)
        group = self.process_set.group
        on_device = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_device else torch.device("cpu")
        flags = torch.zeros(n, dtype=torch.int32, device=device)
        for b in self._host_tripped:
            flags[b] = 1
        for b, (maxima, _) in self._device.items():
            flags[b] = (~torch.isfinite(maxima)).any().to(device=device, dtype=torch.int32)
        local = flags.clone() if self._device else None
        self._combine = (dist.all_reduce(flags, group=group, async_op=True), flags, local)

    def finish_step(self, step: Optional[int] = None, num_buckets: Optional[int] = None, defer: bool = False
                    ) -> "Optional[NonFiniteReport] | DeferredVerdict":
        """Finish combining this step's flags across the process set; return the report, or None when
        every gradient of every rank was finite. Every member must call it once per step, after its
        buckets (it starts the combine itself when no bucket was marked ``last``).

        Args:
            step: the step number to report (default: this check's own count, 1-based).
            num_buckets: buckets this step (default: the highest checked index + 1).
            defer: the caller can act on a verdict that stays on the device (constraint 6): when this
                step was checked on the device, return a :class:`DeferredVerdict` instead of reading the
                flags on the host. Steps checked on the host (the CPU) return the report as always.

        Returns:
            The report (None: all finite), or a :class:`DeferredVerdict` (``defer`` and a device check).
        """
        start = time.perf_counter()
        try:
            return self._finish_step(step, num_buckets, defer)
        finally:
            self.combine_s += time.perf_counter() - start

    def _finish_step(self, step: Optional[int], num_buckets: Optional[int], defer: bool):
        self.steps += 1
        step = self.steps if step is None else step
        if self._combine is None:
            self.start_combine(num_buckets)
        work, flags, local = self._combine
        work.wait()  # on NCCL: the current stream waits for the allreduce; the host goes on
        held = (dict(self._host_tripped), dict(self._device), local)
        on_device = bool(self._device)
        self._reset()
        if defer and on_device and self.defer is not False:
            found_inf = (flags.sum() > 0).to(torch.float32)  # on the device: no host read
            return DeferredVerdict(self, step, flags, found_inf, held)
        return self._report(step, flags.tolist(), held)  # on CUDA the one host sync of the check

    def _report(self, step: int, combined: list, held: tuple) -> Optional[NonFiniteReport]:
        """The report of ``step`` from the combined flags and this rank's held findings: collective (one
        ``all_gather`` of the findings) when any flag is set, so every member calls it at the same point
        of its collective order (constraints 4 and 6)."""
        if not any(combined):
            return None
        host_tripped, device, local = held
        mine = self._findings(host_tripped, device, local)
        group = self.process_set.group
        # Constraint 4, as JSON (shoal.core.exchange): a peer's findings are data, never unpickled.
        everyone = exchange.allgather_json([dataclasses.asdict(t) for t in mine], group=group)
        tensors = sorted((NonFiniteTensor(**t) for found in everyone for t in found),
                         key=lambda t: (t.bucket, t.position, t.rank))
        report = NonFiniteReport(step=step, tensors=tuple(tensors),
                                 ranks=tuple(sorted({t.rank for t in tensors})), policy=self.policy)
        log.info("%s", report.describe())
        return report

    @staticmethod
    def _findings(host_tripped: dict, device: dict, local: Optional[torch.Tensor]) -> list[NonFiniteTensor]:
        """This rank's non-finite tensors (the rare path: host copies are fine here)."""
        found = [t for b in sorted(host_tripped) for t in host_tripped[b]]
        me = runtime.rank()  # the world rank, as everywhere in Shoal (apply_nan_policy, drill_down)
        for b, (maxima, tensors) in sorted(device.items()):
            if local is None or not int(local[b]):
                continue
            named = [(name, view.numel()) for name, view in tensors()]
            for pos, m in enumerate(maxima.tolist()):
                if m != m:
                    kind = "nan"
                elif m in (float("inf"), float("-inf")):
                    kind = "inf"
                else:
                    continue
                found.append(NonFiniteTensor(named[pos][0], me, kind, b, pos, named[pos][1]))
        return found


class DeferredVerdict:
    """A step's verdict kept on the device (constraint 6): ``found_inf`` for the optimizer step now, the
    report later.

    Attributes:
        step: the step the verdict belongs to.
        policy: the policy in force.
        found_inf: a float32 scalar on the flags' device, 1.0 when a gradient of any rank was non-finite:
            what torch's fused optimizers take (``optimizer.found_inf``, as GradScaler hands it over).
        stepped: set by the frontend when it applied its (guarded) optimizer step for this verdict; a
            verdict never stepped (AMP's GradScaler skipped ``step()`` itself) gets its report, no policy.
    """

    def __init__(self, check: FiniteCheck, step: int, flags: torch.Tensor, found_inf: torch.Tensor, held: tuple):
        self.step = step
        self.policy = check.policy
        self.found_inf = found_inf
        self.stepped = False
        self._check = check
        self._flags = flags
        self._held = held
        self._generation = runtime.generation()
        self._combined: Optional[list] = None
        self._resolved = False
        self._report: Optional[NonFiniteReport] = None

    def tripped(self) -> bool:
        """Whether any rank found a non-finite gradient: one host read of the combined flags, no collective
        (the flags are the same on every rank)."""
        if self._combined is None:
            self._combined = self._flags.tolist()
        return any(self._combined)

    def resolve(self) -> Optional[NonFiniteReport]:
        """The report (None: all finite), built once. Collective when :meth:`tripped` (the findings'
        ``all_gather``): every member resolves at the same point of its collective order (constraint 6).
        A verdict of an earlier world (elastic training) is dropped: its group is gone."""
        if self._resolved:
            return self._report
        self._resolved = True
        if self._generation != runtime.generation():
            log.warning("shoal: the NaN/Inf verdict of step %d belongs to a world that ended; dropped", self.step)
            return None
        start = time.perf_counter()
        try:
            if self.tripped():
                self._report = self._check._report(self.step, self._combined, self._held)
        finally:
            self._check.combine_s += time.perf_counter() - start
            self._held = ()
        return self._report


def _sum(x: torch.Tensor) -> torch.Tensor:
    """Constraint 1's reduction: 16-bit values summed in float32, so that they cannot overflow it."""
    return x.sum(dtype=torch.float32) if x.element_size() < 4 else x.sum()


def _scan(tensors: Sequence[tuple[str, torch.Tensor]], bucket: int, rank: int) -> list[NonFiniteTensor]:
    """Exact per-tensor counts of NaN and Inf (constraint 3; runs only on a tripped bucket)."""
    found = []
    for pos, (name, view) in enumerate(tensors):
        nan = int(torch.isnan(view).sum())
        inf = int(torch.isinf(view).sum())
        if nan or inf:
            kind = "nan+inf" if nan and inf else ("nan" if nan else "inf")
            found.append(NonFiniteTensor(name, rank, kind, bucket, pos, view.numel(), nan, inf))
    return found


def make_finite_check(policy: Optional[str], process_set: runtime.ProcessSet) -> Optional[FiniteCheck]:
    """The check for ``policy`` (None: the config's ``nan_check``); None when the policy is ``off``."""
    policy = runtime.config().nan_check if policy is None else policy
    if policy not in NAN_POLICIES:
        raise ValueError(f"shoal: nan_check={policy!r} is not one of {', '.join(NAN_POLICIES)}")
    return None if policy == "off" else FiniteCheck(policy, process_set)


def apply_nan_policy(report: Optional[NonFiniteReport], deferred: bool = False) -> bool:
    """Apply ``report.policy`` on this rank; every rank calls it with the same report.

    Args:
        report: the step's report (None: nothing to do).
        deferred: the policy comes after the step, from a :class:`DeferredVerdict` (the error says so).

    Returns:
        True when the step must be skipped (``skip``), False otherwise (no report, or ``warn``).
    Raises:
        NonFiniteGradientError: under ``raise``.
    """
    if report is None:
        return False
    if report.policy == "raise":
        raise NonFiniteGradientError(report, deferred)
    # Log where a reader looks: the first rank, and the ranks the values came from.
    loud = dist.get_rank() in report.ranks or dist.get_rank() == 0
    level = logging.WARNING if loud else logging.DEBUG
    if report.policy == "skip":
        log.log(level, "%s Skipping the optimizer step on every rank (nan_check='skip').", report.describe())
        return True
    log.log(level, "%s Applying it anyway (nan_check='warn').", report.describe())
    return False
