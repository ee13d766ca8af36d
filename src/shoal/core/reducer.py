"""The gradient reducer: fused, overlapped, multi-stream reduction of a fixed set of named tensors.

Frontends hand it tensor specs once, then, every step, "tensor i is ready" events; it owns the flat bucket
buffers (the frontend makes each gradient a view into them) and the in-flight collectives.

Design constraints:

1. Zero copies on the hot path. Gradients live in persistent flat buffers (the frontend points ``param.grad``
   at :attr:`GradientReducer.views`), so a full bucket goes on the wire as it is. Measured on this machine:
   allocating a fresh 100 MB fusion buffer every step costs ~100 ms, copying through a persistent one 37-46 ms,
   views nothing.
2. Overlap: a bucket is launched (``async_op``) the moment its last tensor is ready, while backward goes on;
   ``finish`` waits only for what is still in flight.
3. Same collective order on every rank: launch units (slices of buckets, :func:`plan_launch_units`; one
   per bucket unless the cross-barrier defers some) are launched strictly in plan order (a unit that fills
   early waits for its predecessors), so no rank can issue collectives in a different order.
4. Several buckets in flight: unit ``u`` goes on stream ``u % num_streams``, each stream its own process
   group (on GPU each NCCL communicator has its own CUDA stream; on gloo each group its own threads).
5. No background loop of ours: completion work (scaling) runs as a future callback on the backend's own
   completion thread, so an idle rank costs nothing (an idle Horovod rank burns ~7% of a core here for its
   1 ms cycle).
6. One pass per gradient, on the way in. Each gradient is multiplied by ``prescale * postscale`` (``1/n``
   for Average) as it enters its bucket: fused into the copy when autograd handed over a fresh gradient
   (:meth:`GradientReducer.load`, as DDP fuses its division into its bucket copy), in place otherwise. The
   algorithms then only sum. Dividing before the sum is exact for power-of-two world sizes, keeps 16-bit
   wires from overflowing, and saves the pass over every bucket that a post-multiply would cost.
7. Deferred heads (the cross-barrier's) go on the wire only once every earlier unit is reduced (gloo runs
   a group's operations on two threads: issue order is not wire order). Waiting is in launch order and may
   be spread over time: ``finish()`` with :attr:`GradientReducer.leave_deferred` returns once the units
   before the heads are in (the step stays open), :meth:`GradientReducer.wait_for` waits up to the unit
   that completes a given tensor (from the next forward, layer by layer), and the next ``finish()`` waits
   for the rest and closes the step.

What lives elsewhere: the bucket plan (:mod:`shoal.core.buckets`), the per-bucket algorithm (flat or
hierarchical, with or without compression: :mod:`shoal.core.algorithms`), hooks into autograd (frontends).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import runtime
from .algorithms import ReduceContext, get_algorithm
from .buckets import BucketPlan, LaunchUnit, TensorSpec, plan_buckets, plan_launch_units
from .checks import make_finite_check
from .errors import ShoalError
from . import timeline as _timeline

__all__ = ["GradientReducer", "ReduceOp", "ENGINE_OPTIONS", "check_engine_options"]

log = logging.getLogger(__name__)

_MB = 1024 * 1024

#: Keywords a frontend's optimizer wrapper passes through to :class:`GradientReducer` (per-optimizer
#: overrides of the runtime config); frontends refuse any other keyword when the wrapper is built.
ENGINE_OPTIONS = frozenset({"fusion_threshold_mb", "first_bucket_mb", "num_streams", "hierarchical",
                            "error_feedback", "nan_check"})


def check_engine_options(options, what: str) -> None:
    """Raise ``TypeError`` naming any key of ``options`` that is not in :data:`ENGINE_OPTIONS`."""
    unknown = sorted(set(options) - ENGINE_OPTIONS)
    if unknown:
        raise TypeError(f"shoal: {what} got unknown keyword(s) {unknown}. HINT: the engine options are "
                        f"{', '.join(sorted(ENGINE_OPTIONS))}.")


class ReduceOp:
    """Reductions the engine supports for gradients."""

    AVERAGE = "average"
    SUM = "sum"


class GradientReducer:
    """Reduces a fixed set of named tensors across a process set, one flat bucket at a time.

    Args:
        specs: the tensors (name, shape, dtype, device), in registration order.
        op: ``ReduceOp.AVERAGE`` or ``ReduceOp.SUM``.
        prescale_factor / postscale_factor: multiply before the sum / after it (Horovod's meaning).
        process_set: ranks to reduce over (default: all).
        fusion_threshold_mb / first_bucket_mb / num_streams / compression / hierarchical /
            error_feedback: default from the runtime config.
        groups: explicit grouping of tensor indices into buckets (Horovod's ``groups=``).
        negotiator: the frontend's :class:`shoal.core.negotiation.Negotiator` (a control slot after the last
            bucket, launch tracking, the stall inspector in :meth:`finish`), or None.

    Example (what a frontend does each step)::

        red = GradientReducer(specs)
        for i, p in enumerate(params): p.grad = red.views[i]
        ... backward: on each gradient's accumulation hook -> red.mark_ready(i)
        red.finish()        # every view now holds the averaged gradient
    """

    def __init__(self, specs: Sequence[TensorSpec], *, op: str = ReduceOp.AVERAGE,
                 prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                 process_set: Optional[runtime.ProcessSet] = None,
                 fusion_threshold_mb: Optional[float] = None, first_bucket_mb: Optional[float] = None,
                 num_streams: Optional[int] = None, compression: Optional[str] = None,
                 hierarchical: Optional[str] = None,
                 groups: Optional[Sequence[Sequence[int]]] = None, nan_check: Optional[str] = None,
                 error_feedback: Optional[bool] = None, negotiator=None):
        cfg = runtime.config()
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"shoal: tensor names must be unique; duplicated: {dup[:5]}")
        self.process_set = runtime.get_process_set(process_set)
        self.world = self.process_set.size()
        if op not in (ReduceOp.AVERAGE, ReduceOp.SUM):
            raise ValueError(f"shoal: gradient op must be Average or Sum, got {op!r}")
        self.op = op
        self.prescale = float(prescale_factor)
        self.postscale = float(postscale_factor) / (self.world if op == ReduceOp.AVERAGE else 1)
        #: Multiplier applied to every tensor as it enters its bucket (constraint 6).
        self.load_scale = self.prescale * self.postscale
        self.bucket_nbytes = int((fusion_threshold_mb or cfg.fusion_threshold_mb) * _MB)
        self.first_bucket_nbytes = int((first_bucket_mb or cfg.first_bucket_mb) * _MB)
        self.num_streams = int(num_streams or cfg.num_streams)
        self.compression = compression or cfg.compression
        self.hierarchical = hierarchical or cfg.hierarchical
        self._algorithm = get_algorithm(self.compression, self.hierarchical, self.process_set,
                                        num_streams=self.num_streams, error_feedback=error_feedback)
        self._groups_override = [list(g) for g in groups] if groups is not None else None
        self._streams = runtime.stream_groups(self.process_set, self.num_streams)
        # NaN/Inf check (shoal.core.checks): None when nan_check is off; report of the last finish().
        self.nan_check = make_finite_check(nan_check, self.process_set)
        self.nan_report = None
        self.step = 0
        self._observed: list[int] = []
        #: Ready order of the last finished step (indices of tensors marked ready, in order).
        self.last_order: list[int] = []
        #: shoal.core.negotiation.Negotiator of the frontend (control slot, stall inspector), or None.
        self.negotiator = negotiator
        self._error_feedback = error_feedback  # reconfigure() rebuilds the algorithm for a new stream count
        #: Called as ``tensors_done(ids)`` the moment the tensors ``ids`` are reduced, while later units are
        #: still on the wire (the frontend steps the optimizer on those parameters); None: :meth:`finish`
        #: waits for every unit first. Set per step by the frontend; :meth:`finish` clears it.
        self.tensors_done: Optional[Callable[[list[int]], None]] = None
        #: Fraction of the gradient bytes whose launch is deferred to the end of the step (constraint 5 of
        #: :mod:`shoal.core.buckets`); set by the cross-barrier, 0 otherwise. Takes effect at the next plan.
        self.defer_fraction = 0.0
        self._defer_next: Optional[float] = None  # set_defer_fraction() mid-step
        #: Set by the frontend before a step's finish(): return once every unit before the deferred heads
        #: is reduced, the heads still in flight and the step open (the next finish() closes it).
        self.leave_deferred = False
        _timeline.maybe_start_from_config(cfg)  # SHOAL_TIMELINE_FILENAME alone starts the timeline
        self._build(order=None)

    # ----------------------------------------------------------------------------------- planning
    def _build(self, order: Optional[Sequence[int]]) -> None:
        self.plans: list[BucketPlan] = plan_buckets(
            self.specs, order, bucket_nbytes=self.bucket_nbytes,
            first_bucket_nbytes=self.first_bucket_nbytes, groups=self._groups_override)
        self.order = list(order) if order is not None else list(range(len(self.specs) - 1, -1, -1))
        self.buffers: list[torch.Tensor] = [
            torch.zeros(p.numel, dtype=p.dtype, device=p.device) for p in self.plans]
        if self.negotiator is not None and self.buffers:  # control slot after the last bucket (negotiation)
            self.buffers[-1] = self.negotiator.extend_last_bucket(self.buffers[-1])
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(self.specs)
        self.bucket_of: list[int] = [0] * len(self.specs)
        for p, buf in zip(self.plans, self.buffers):
            for t, off in zip(p.tensor_ids, p.offsets):
                spec = self.specs[t]
                self.views[t] = buf[off:off + spec.numel].view(spec.shape)
                self.bucket_of[t] = p.index
        self._plan_units()

    def _plan_units(self) -> None:
        total = sum(p.nbytes for p in self.plans)
        self.units: list[LaunchUnit] = plan_launch_units(
            self.plans, [buf.numel() for buf in self.buffers], defer_nbytes=int(self.defer_fraction * total))
        self._unit_state: list[dict] = [{} for _ in self.units]
        #: Units from here on are deferred heads: launched only once every earlier unit is reduced, so
        #: that they really are last on the wire whatever the stream count (constraint 7).
        self._first_deferred = len(self.plans) if len(self.units) > len(self.plans) else len(self.units)
        # Per unit, the tensors that are fully reduced once the units up to it (in launch order) are done.
        last_unit: dict[int, int] = {}
        for u, unit in enumerate(self.units):
            plan = self.plans[unit.bucket]
            for t, off in zip(plan.tensor_ids, plan.offsets):
                if off < unit.stop and off + self.specs[t].numel > unit.start:
                    last_unit[t] = u
        first_unit: dict[int, int] = {}
        for u, unit in enumerate(self.units):
            first_unit.setdefault(unit.bucket, u)
        for p in self.plans:  # empty tensors overlap no slice: done with their bucket's first unit
            for t in p.tensor_ids:
                if t not in last_unit:
                    last_unit[t] = first_unit[p.index]
        self.done_at: list[list[int]] = [[] for _ in self.units]
        for t, u in sorted(last_unit.items()):
            self.done_at[u].append(t)
        self._last_unit_of = last_unit
        self._reset_step()

    def _reset_step(self) -> None:
        self._pending = [len(p.tensor_ids) for p in self.plans]
        self._ready = [False] * len(self.specs)
        self._futures: list[Optional[torch.futures.Future]] = [None] * len(self.units)
        self._next_launch = 0  # next unit to launch
        self._waited = 0  # units waited for (in launch order)
        self._all_launched = False
        self._deferred_released = False
        self._wait_error: Optional[BaseException] = None
        self._bucket_started = [False] * len(self.plans)
        self._launched_at: list[float] = [0.0] * len(self.units)
        # The timeline recorder, looked up once per step: one attribute test per gradient when off.
        self._tl = _timeline.active()
        self._fill_ns: dict[int, int] = {}  # timeline only: bucket -> first gradient ready

    def rebucket(self, order: Sequence[int]) -> bool:
        """Re-plan the buckets for ``order`` (the ready order seen on the process set's first rank).

        Current values move to the new buffers. Returns True when the plan changed; the frontend must
        then re-point its gradients at the new :attr:`views`.
        """
        if self.in_flight:
            raise ShoalError("shoal: rebucket() while buckets are in flight; call finish() first")
        if list(order) == self.order:
            return False
        old_views = self.views
        self._build(order)
        for new, old in zip(self.views, old_views):
            new.copy_(old)
        return True

    def reconfigure(self, *, bucket_nbytes: Optional[int] = None, num_streams: Optional[int] = None) -> bool:
        """Switch to another bucket size and/or stream count between steps (the autotuner's lever).

        The ready order stays; the buckets are re-planned and the current values move to the new buffers,
        so the next reduction sums the same numbers. Call it on every rank of the process set at the same
        step: a stream count not used before creates process groups (collective over the world).

        Args:
            bucket_nbytes: new target size of every bucket but the first.
            num_streams: new number of buckets in flight at once.

        Returns:
            True when the plan changed; the frontend must then re-point its gradients at :attr:`views`.

        Example:
            >>> if red.reconfigure(bucket_nbytes=8 << 20, num_streams=3):
            ...     for p, v in zip(params, red.views): p.grad = v
        """
        if self.in_flight:
            raise ShoalError(f"shoal: reconfigure() while buckets are in flight on rank {runtime.rank()}. "
                             "HINT: call it after finish(), before the next backward pass.")
        if num_streams is not None and int(num_streams) != self.num_streams:
            self.num_streams = int(num_streams)
            self._streams = runtime.stream_groups(self.process_set, self.num_streams)
            # Hierarchical algorithms map each stream group to its node groups: rebuild for the new count.
            self._algorithm = get_algorithm(self.compression, self.hierarchical, self.process_set,
                                            num_streams=self.num_streams, error_feedback=self._error_feedback)
        if bucket_nbytes is None or int(bucket_nbytes) == self.bucket_nbytes:
            return False
        self.bucket_nbytes = int(bucket_nbytes)
        new_plans = plan_buckets(self.specs, self.order, bucket_nbytes=self.bucket_nbytes,
                                 first_bucket_nbytes=self.first_bucket_nbytes, groups=self._groups_override)
        if [p.tensor_ids for p in new_plans] == [p.tensor_ids for p in self.plans]:
            return False
        old_views = self.views
        self._build(self.order)
        for new, old in zip(self.views, old_views):
            new.copy_(old)
        return True

    def set_defer_fraction(self, fraction: float) -> None:
        """Defer the launch of this fraction of the gradient bytes to the end of each step (the
        cross-barrier's plan, :func:`~shoal.core.buckets.plan_launch_units`); 0: no deferral. Between steps."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"shoal: defer_fraction must be in [0, 1), got {fraction}")
        if self.in_flight or any(self._ready):  # mid-step: from the next step on (finish() applies it)
            self._defer_next = float(fraction)
            return
        self.defer_fraction = float(fraction)
        self._plan_units()

    def agreed_order(self) -> list[int]:
        """The ready order observed this step on the process set's first rank, completed with the
        tensors that never became ready (reverse registration order), broadcast to every member."""
        seen = set(self.last_order)
        order = self.last_order + [i for i in range(len(self.specs) - 1, -1, -1) if i not in seen]
        box = [order]
        dist.broadcast_object_list(box, src=self.process_set.ranks[0], group=self.process_set.group)
        return box[0]

    # ----------------------------------------------------------------------------------- per step
    @property
    def in_flight(self) -> bool:
        return any(f is not None for f in self._futures)

    def load(self, i: int, tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """Tensor ``i``'s local value is ``tensor``: copy it into its bucket, scaled (one fused pass), and
        mark it ready. ``None`` or the view itself: the value is already in ``views[i]``.

        Returns:
            ``views[i]`` (the frontend points the gradient at it).
        """
        view = self.views[i]
        if tensor is None or (tensor.layout == torch.strided and tensor.data_ptr() == view.data_ptr()):
            self.mark_ready(i)
            return view
        if tensor.is_sparse:
            tensor = tensor.to_dense()
        if self.load_scale != 1.0:
            torch.mul(tensor, self.load_scale, out=view)
        else:
            view.copy_(tensor)
        self.mark_ready(i, scaled=True)
        return view

    def mark_ready(self, i: int, scaled: bool = False) -> None:
        """Tensor ``i`` holds its final local value in ``views[i]`` (already multiplied by
        :attr:`load_scale` when ``scaled``); launch buckets that are complete."""
        if self._ready[i]:
            raise ShoalError(
                f"shoal: gradient of '{self.specs[i].name}' became ready twice in one step on rank "
                f"{runtime.rank()}. HINT: call optimizer.synchronize()/step() between backward passes, or "
                "set backward_passes_per_step to the number of backward passes per step.")
        if not scaled and self.load_scale != 1.0:
            self.views[i].mul_(self.load_scale)
        self._ready[i] = True
        self._observed.append(i)
        b = self.bucket_of[i]
        self._pending[b] -= 1
        tl = self._tl
        if tl is not None:
            self._record_fill(tl, b)
        if self._pending[b] == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        units, pending = self.units, self._pending
        limit = len(units) if self._deferred_released else self._first_deferred
        while self._next_launch < limit and pending[units[self._next_launch].bucket] == 0:
            self._launch(self._next_launch)
            self._next_launch += 1

    def _launch(self, u: int) -> None:
        unit = self.units[u]
        b = unit.bucket
        plan = self.plans[b]
        ctx = ReduceContext(group=self._streams[u % self.num_streams], process_set=self.process_set,
                            prescale=1.0, postscale=1.0, bucket_index=b,  # applied on load (constraint 6)
                            names=lambda plan=plan: [self.specs[t].name for t in plan.tensor_ids],
                            state=self._unit_state[u])
        tl = self._tl
        t_check_ns = tl.now_ns() if tl is not None else 0
        first_of_bucket = not self._bucket_started[b]
        self._bucket_started[b] = True
        if first_of_bucket and self.nan_check is not None:  # before the bucket leaves the rank (checks)
            self.nan_check.check_bucket(b, self.buffers[b], lambda plan=plan: [
                (self.specs[t].name, self.views[t]) for t in plan.tensor_ids], last=b == len(self.plans) - 1)
        self._launched_at[u] = time.perf_counter()
        if first_of_bucket and self.negotiator is not None:  # the control slot of the last bucket
            self.negotiator.on_launch(b, len(self.plans))
        buf = self.buffers[b]
        self._futures[u] = self._algorithm(
            buf if unit.start == 0 and unit.stop == buf.numel() else buf[unit.start:unit.stop], ctx)
        if tl is not None:
            self._record_launch(tl, u, t_check_ns)

    def launch_all(self) -> None:
        """Launch every unit not yet launched; tensors never marked ready go as they are (zeros if the
        frontend zeroed them). Returns at once; :meth:`wait_for` / :meth:`finish` wait."""
        if self._all_launched:
            return
        self._all_launched = True
        if self.load_scale != 1.0:  # tensors never marked ready travel as they are, scaled like the rest
            for i, ready in enumerate(self._ready):
                if not ready:
                    self.views[i].mul_(self.load_scale)
        for b in range(len(self.plans)):
            self._pending[b] = 0
        self._launch_ready()

    def _names_of_unit(self, u: int) -> list[str]:
        return [self.specs[t].name for t in self.plans[self.units[u].bucket].tensor_ids]

    def _wait_units(self, stop: int, done_cb: Optional[Callable[[list[int]], None]]) -> Optional[BaseException]:
        """Wait for units ``_waited .. stop-1`` in launch order, calling ``done_cb`` with the tensors each
        completes. Returns the first exception ``done_cb`` raised (the waits go on); a failed collective is
        kept in ``_wait_error`` (no more callbacks after it)."""
        callback_error: Optional[BaseException] = None
        while self._waited < stop:
            u = self._waited
            if u >= self._first_deferred and not self._deferred_released:
                self._deferred_released = True
                self._launch_ready()
            fut = self._futures[u]
            if fut is None:
                self._waited += 1
                continue
            if done_cb is not None and self._wait_error is None and self.negotiator is not None:
                # One unit at a time, so that done_cb runs while later units are on the wire. A stall
                # error leaves the unit not waited for (the cursor stays).
                self.negotiator.wait([f if k == u else None for k, f in enumerate(self._futures)],
                                     self._names_of_unit)
            self._waited += 1
            try:
                fut.wait()
            except Exception as exc:  # noqa: BLE001 (converted; finish() raises it)
                if self._wait_error is None:
                    names = self._names_of_unit(u)
                    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                    err = runtime.explain_failure(exc, f"gradient allreduce of bucket {self.units[u].bucket} "
                                                       f"({shown})", self.process_set.ranks)
                    err.__cause__ = exc
                    self._wait_error = err
                continue
            if done_cb is not None and self._wait_error is None and callback_error is None and self.done_at[u]:
                try:
                    done_cb(self.done_at[u])
                except BaseException as exc:  # noqa: BLE001 (re-raised by the caller)
                    callback_error = exc
        if self._waited == self._first_deferred and not self._deferred_released and self._all_launched:
            self._deferred_released = True  # the rest of the wire runs while the caller goes on
            self._launch_ready()
        return callback_error

    def wait_for(self, i: int) -> bool:
        """Wait (in launch order) until tensor ``i`` is reduced, calling :attr:`tensors_done` for every
        tensor completed on the way; the step stays open (:meth:`finish` closes it).

        Returns:
            True when ``views[i]`` now holds the reduced value; False when a collective failed (then
            :meth:`finish` raises the error).
        """
        if not self._all_launched:
            raise ShoalError("shoal: wait_for() before launch_all()")
        err = self._wait_units(self._last_unit_of[i] + 1, self.tensors_done)
        if err is not None:
            self.tensors_done = None
            raise err
        return self._wait_error is None

    @property
    def units_left(self) -> int:
        """Units of this step not yet waited for."""
        return len(self.units) - self._waited

    def finish(self) -> None:
        """Launch every unit not yet launched (:meth:`launch_all`), wait for all, and leave the reduced
        values in :attr:`views`.

        Raises:
            RankFailureError: a peer died or timed out; the message names the bucket's first tensors.
        """
        tl = self._tl
        t_wait_ns = tl.now_ns() if tl is not None else 0
        self.launch_all()
        leave, self.leave_deferred = self.leave_deferred, False
        leave = leave and self._first_deferred < len(self.units)
        done_cb = self.tensors_done
        if not leave:
            self.tensors_done = None
        if self.negotiator is not None and done_cb is None:
            # Stall inspector: warns, then fails naming the ranks missing.
            self.negotiator.wait(self._futures[self._waited:],
                                 lambda k, base=self._waited: self._names_of_unit(base + k))
        callback_error = self._wait_units(self._first_deferred if leave else len(self.units), done_cb)
        if leave and callback_error is None and self._wait_error is None:
            return  # the deferred heads are in flight (released by _wait_units); the next finish() closes
        if leave:  # an error: close the step as a plain finish() would
            self.tensors_done = None
            callback_error = self._wait_units(len(self.units), None) or callback_error
        error = self._wait_error
        self.last_order = list(self._observed)
        self.step += 1
        if tl is not None:
            tl.complete("synchronize", "wait for buckets", t_wait_ns, tl.now_ns(), "main", {"step": self.step})
            tl.mark_step(self.step)
        self._observed = []
        self._reset_step()
        if self._defer_next is not None:
            self.defer_fraction, self._defer_next = self._defer_next, None
            self._plan_units()
        if error is not None:
            raise error
        if callback_error is not None:
            raise callback_error
        if self.nan_check is not None:
            self.nan_report = self.nan_check.finish_step(self.step, num_buckets=len(self.plans))

    # ----------------------------------------------------------------------------------- timeline
    def _record_fill(self, tl, b: int) -> None:
        """Waiting for gradients: bucket ``b`` from its first ready gradient to its last."""
        now = tl.now_ns()
        start = self._fill_ns.setdefault(b, now)
        if self._pending[b] == 0:
            tl.complete("wait_for_gradients", f"fill b{b}", start, now, "gradients",
                        {"bucket": b, "step": self.step + 1, "tensors": len(self.plans[b].tensor_ids)})

    def _record_launch(self, tl, u: int, t_check_ns: int) -> None:
        """NaN check (main track), then communication from launch to completion on the unit's stream;
        the end is stamped by a callback on the backend's completion thread (the timeline is thread-safe)."""
        unit = self.units[u]
        b = unit.bucket
        t_launch_ns = int(self._launched_at[u] * 1e9)  # perf_counter and perf_counter_ns share one clock
        step = self.step + 1
        if self.nan_check is not None:
            tl.complete("nan_check", f"nan check b{b}", t_check_ns, t_launch_ns, "main", {"bucket": b, "step": step})
        stream = u % self.num_streams
        whole = unit.start == 0 and unit.stop == self.buffers[b].numel()
        nbytes = self.plans[b].nbytes if whole else (unit.stop - unit.start) * self.buffers[b].element_size()
        args = {"bucket": b, "step": step, "stream": stream, "nbytes": nbytes,
                "tensors": len(self.plans[b].tensor_ids), "algorithm": self.compression}
        if not whole:
            args["slice"] = [unit.start, unit.stop]
        name = f"allreduce b{b}" if whole else f"allreduce b{b}[{unit.start}:{unit.stop}]"

        def done(_fut) -> None:
            tl.complete("communication", name, t_launch_ns, tl.now_ns(), f"stream {stream}", args)

        self._futures[u].add_done_callback(done)
