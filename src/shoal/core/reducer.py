"""The gradient reducer: fused, overlapped, multi-stream reduction of a fixed set of named tensors.

The step owner (:mod:`shoal.core.step`) hands it tensor specs once, then, every step, "tensor i is ready"
events; it owns the flat bucket buffers (the frontend makes each gradient a view into them) and the
collectives in flight. What happens on the way (a bucket about to leave, a bucket reduced, a wait) it tells
its observers (:class:`ReducerObserver`): the negotiation, the NaN check, the timeline, an overlapped
optimizer step. It knows none of them by name.

Design constraints:

1. Zero copies on the hot path. Gradients live in persistent flat buffers (the frontend points ``param.grad``
   at :attr:`GradientReducer.views`), so a full bucket goes on the wire as it is. Measured on this machine:
   allocating a fresh 100 MB fusion buffer every step costs ~100 ms, copying through a persistent one 37-46 ms,
   views nothing.
2. Overlap: a bucket is launched (``async_op``) the moment its last tensor is ready, while backward goes on;
   ``finish`` waits only for what is still in flight.
3. Same collective order on every rank: buckets are launched strictly in plan order (a bucket that fills
   early waits for its predecessors), so no rank can issue collectives in a different order.
4. Several buckets in flight: bucket ``b`` goes on stream ``b % num_streams``, each stream its own process
   group (on GPU each NCCL communicator has its own CUDA stream; on gloo each group its own threads), and
   one bucket at a time on each stream, in launch order (:func:`shoal.core.runtime.launch_in_order`): gloo
   would run two of one group at once, and a later small bucket would overtake an earlier big one.
5. No background loop of ours: completion work (scaling) runs as a future callback on the backend's own
   completion thread, so an idle rank costs nothing (an idle Horovod rank burns ~7% of a core here for its
   1 ms cycle).
6. One pass per gradient, on the way in. Each gradient is multiplied by ``prescale * postscale`` (``1/n``
   for Average) as it enters its bucket: fused into the copy when autograd handed over a fresh gradient
   (:meth:`GradientReducer.load`, as DDP fuses its division into its bucket copy), in place otherwise. The
   algorithms then only sum. Dividing before the sum is exact for power-of-two world sizes, keeps 16-bit
   wires from overflowing, and saves the pass over every bucket that a post-multiply would cost.
7. One narrow extension point (DDP's ``hook(state, bucket)`` idea): observers implement the methods of
   :class:`ReducerObserver` they need; which ones are called is settled once per step (``wants``), so an
   event nobody listens to costs an empty loop (the timeline's per-gradient event when it is off). Nobody
   assigns callbacks onto the reducer or reads its private fields.
8. A pass over a gradient that must read it anyway reads it while it is in the cache: an ``on_loaded``
   listener (the NaN check) gets each gradient in parts of :data:`LOAD_PART` elements, right after the
   scaling pass of constraint 6 wrote each part (the part is then in the cache, and summing it costs a
   fraction of reading it from memory again: numbers in :mod:`shoal.core.checks`). Without listeners
   the pass is one op per gradient, as before.

What lives elsewhere: the bucket plan (:mod:`shoal.core.buckets`), the per-bucket algorithm (flat or
hierarchical, with or without compression: :mod:`shoal.core.algorithms`), the step's protocol around the
reduction (negotiation, NaN policy, tuning: :mod:`shoal.core.step`), hooks into autograd (frontends).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from . import runtime
from . import timeline as _timeline
from .algorithms import ReduceContext, get_algorithm
from .buckets import BucketPlan, TensorSpec, plan_buckets
from .errors import ShoalError
from .ops import ReduceOp

__all__ = ["GradientReducer", "ReducerObserver", "TimelineObserver", "OBSERVER_EVENTS", "LOAD_PART"]

log = logging.getLogger(__name__)

_MB = 1024 * 1024

#: ``(name, view)`` of every tensor of a bucket, in bucket order; called only when it is needed.
TensorsOf = Callable[[], Sequence[tuple[str, torch.Tensor]]]

#: The events of :class:`ReducerObserver`, in the order a step raises them.
OBSERVER_EVENTS = ("on_loaded", "on_ready", "before_launch", "after_launch", "before_wait", "on_done", "on_finish")

#: Elements per part of a tensor handed to ``on_loaded`` listeners: 4 MB of fp32, so that the part is still
#: in the cache when the listener reads it (constraint 8).
LOAD_PART = 1 << 20


def _load_parts(numel: int) -> list[slice]:
    """The parts of a flat tensor of ``numel`` elements that ``on_loaded`` listeners get (constraint 8): all of
    it up to :data:`LOAD_PART` elements, else consecutive parts of that size."""
    if numel <= LOAD_PART:
        return [slice(None)]
    return [slice(start, start + LOAD_PART) for start in range(0, numel, LOAD_PART)]


class ReducerObserver:
    """What an observer of a :class:`GradientReducer` may hear (constraint 7). Override what you need.

    Attributes:
        tail_numel: elements this observer wants appended after the last bucket's tensors, in the same
            collective (the negotiation's control slot); handed over in :meth:`on_buffers`.
    """

    tail_numel: int = 0

    def wants(self, event: str) -> bool:
        """Whether to call ``event`` in the step that starts now (asked once per step and event)."""
        return True

    def on_buffers(self, reducer: "GradientReducer", tail: Optional[torch.Tensor]) -> None:
        """The buffers were (re)allocated; ``tail`` is this observer's slice of the last bucket, or None."""

    def on_loaded(self, reducer: "GradientReducer", i: int, part: torch.Tensor) -> None:
        """``part`` (a flat slice of tensor ``i``'s view, or all of it) was just written with its final
        local value and is still in the cache (constraint 8); every element of the tensor is handed over
        once per step in which the tensor is marked ready."""

    def on_ready(self, reducer: "GradientReducer", i: int, bucket: int) -> None:
        """Tensor ``i`` of ``bucket`` holds its local value (once per tensor and step; the hot path)."""

    def before_launch(self, reducer: "GradientReducer", bucket: int, buffer: torch.Tensor,
                      tensors: TensorsOf) -> None:
        """``bucket`` (``buffer``, still local) is about to go on the wire."""

    def after_launch(self, reducer: "GradientReducer", bucket: int, future: torch.futures.Future) -> None:
        """``bucket`` is on the wire; ``future`` completes when it is reduced."""

    def before_wait(self, reducer: "GradientReducer", futures: Sequence[Optional[torch.futures.Future]],
                    names_of: Callable[[int], list[str]]) -> None:
        """The caller is about to block on ``futures`` (indexed by bucket; None: done or not waited here).
        May raise (a stall); returns when every future is done or one failed."""

    def on_done(self, reducer: "GradientReducer", bucket: int, tensor_ids: list[int]) -> None:
        """``bucket`` is reduced: its tensors ``tensor_ids`` hold their final values. Listening to this
        makes :meth:`GradientReducer.finish` wait bucket by bucket (later ones still on the wire)."""

    def on_finish(self, reducer: "GradientReducer", step: int) -> None:
        """Every bucket of step ``step`` (1-based) is reduced."""


def _overrides(obs: ReducerObserver, event: str) -> bool:
    return getattr(type(obs), event) is not getattr(ReducerObserver, event)


class GradientReducer:
    """Reduces a fixed set of named tensors across a process set, one flat bucket at a time.

    Args:
        specs: the tensors (name, shape, dtype, device), in registration order.
        op: ``ReduceOp.Average`` or ``ReduceOp.Sum``.
        prescale_factor / postscale_factor: multiply before the sum / after it (Horovod's meaning).
        process_set: ranks to reduce over (default: all).
        fusion_threshold_mb / first_bucket_mb / num_streams / compression / hierarchical /
            error_feedback: the resolved settings (:func:`shoal.core.step.resolve_settings`).
        groups: explicit grouping of tensor indices into buckets (Horovod's ``groups=``).
        observers: :class:`ReducerObserver` objects, told what happens (constraint 7).
        steps: returns the number of steps completed before this one (the step owner's counter), for
            the events that carry a step number; default: the reducer counts its own.

    Example (what the step owner does each step)::

        red = GradientReducer(specs, fusion_threshold_mb=25, first_bucket_mb=1, num_streams=2)
        for i, p in enumerate(params): p.grad = red.views[i]
        ... backward: on each gradient's accumulation hook -> red.mark_ready(i)
        red.finish()        # every view now holds the averaged gradient
    """

    def __init__(self, specs: Sequence[TensorSpec], *, op: ReduceOp = ReduceOp.Average,
                 prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                 process_set: Optional[runtime.ProcessSet] = None,
                 fusion_threshold_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 num_streams: int = 2, compression: str = "none", hierarchical: str = "auto",
                 error_feedback: bool = False, groups: Optional[Sequence[Sequence[int]]] = None,
                 observers: Sequence[ReducerObserver] = (), steps: Optional[Callable[[], int]] = None):
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"shoal: tensor names must be unique; duplicated: {dup[:5]}")
        self.process_set = runtime.get_process_set(process_set)
        self.world = self.process_set.size()
        if op not in (ReduceOp.Average, ReduceOp.Sum):
            raise ValueError(f"shoal: gradient op must be Average or Sum, got {op!r}")
        self.op = op
        self.prescale = float(prescale_factor)
        self.postscale = float(postscale_factor) / (self.world if op == ReduceOp.Average else 1)
        #: Multiplier applied to every tensor as it enters its bucket (constraint 6).
        self.load_scale = self.prescale * self.postscale
        self.bucket_nbytes = int(fusion_threshold_mb * _MB)
        self.first_bucket_nbytes = int(first_bucket_mb * _MB)
        self.num_streams = int(num_streams)
        self.compression = compression
        self.hierarchical = hierarchical
        self._error_feedback = bool(error_feedback)
        self._algorithm = get_algorithm(self.compression, self.hierarchical, self.process_set,
                                        num_streams=self.num_streams, error_feedback=self._error_feedback)
        self.groups = [list(g) for g in groups] if groups is not None else None
        self._streams = runtime.stream_groups(self.process_set, self.num_streams)
        self.observers: list[ReducerObserver] = list(observers)
        self._own_steps = 0
        self._steps = steps if steps is not None else (lambda: self._own_steps)
        self._observed: list[int] = []
        #: Ready order of the last finished step (indices of tensors marked ready, in order).
        self.last_order: list[int] = []
        _timeline.maybe_start_from_config(runtime.config())  # SHOAL_TIMELINE_FILENAME alone starts it
        self._epoch = 0  # which step a launch belongs to (constraint 4)
        self._build(order=None)

    # ----------------------------------------------------------------------------------- planning
    def _build(self, order: Optional[Sequence[int]]) -> None:
        self.plans: list[BucketPlan] = plan_buckets(
            self.specs, order, bucket_nbytes=self.bucket_nbytes,
            first_bucket_nbytes=self.first_bucket_nbytes, groups=self.groups)
        self.order = list(order) if order is not None else list(range(len(self.specs) - 1, -1, -1))
        tails = [o.tail_numel for o in self.observers]
        self.buffers: list[torch.Tensor] = [
            torch.zeros(p.numel + (sum(tails) if b == len(self.plans) - 1 else 0), dtype=p.dtype,
                        device=p.device) for b, p in enumerate(self.plans)]
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(self.specs)
        self.bucket_of: list[int] = [0] * len(self.specs)
        for p, buf in zip(self.plans, self.buffers):
            for t, off in zip(p.tensor_ids, p.offsets):
                spec = self.specs[t]
                self.views[t] = buf[off:off + spec.numel].view(spec.shape)
                self.bucket_of[t] = p.index
        #: Per bucket: the algorithm's state that persists across steps (error-feedback residuals).
        self._bucket_state: list[dict] = [{} for _ in self.plans]
        offset = self.plans[-1].numel if self.plans else 0
        for obs, n in zip(self.observers, tails):
            tail = self.buffers[-1][offset:offset + n] if n and self.buffers else None
            offset += n
            obs.on_buffers(self, tail)
        self._reset_step()

    def _reset_step(self) -> None:
        self._epoch += 1  # launches of the step before that still wait for their stream are void
        self._pending = [len(p.tensor_ids) for p in self.plans]
        self._ready = [False] * len(self.specs)
        self._futures: list[Optional[torch.futures.Future]] = [None] * len(self.plans)
        self._next_launch = 0  # next bucket to launch
        self._waited = 0  # buckets waited for (in launch order)
        self._all_launched = False
        self._wait_error: Optional[BaseException] = None
        # Constraint 7: who hears what in this step, settled once (the waits' listeners when the waits
        # come: an observer may be armed between backward and the step's end, e.g. the overlapped step).
        self._calls = {ev: self._listeners(ev)
                       for ev in ("on_loaded", "on_ready", "before_launch", "after_launch", "on_finish")}

    def _listeners(self, event: str) -> list[Callable]:
        return [getattr(o, event) for o in self.observers if _overrides(o, event) and o.wants(event)]

    def add_observer(self, observer: ReducerObserver) -> None:
        """Add an observer between steps (one that reserves a tail must be given to the constructor)."""
        if self.in_flight:
            raise ShoalError("shoal: add_observer() while buckets are in flight; call finish() first")
        if observer.tail_numel:
            raise ValueError("shoal: an observer with a tail must be given to GradientReducer(observers=...)")
        self.observers.append(observer)
        self._reset_step()

    def remove_observer(self, observer: ReducerObserver) -> None:
        """Remove an observer between steps."""
        if self.in_flight:
            raise ShoalError("shoal: remove_observer() while buckets are in flight; call finish() first")
        self.observers.remove(observer)
        self._reset_step()

    def rebucket(self, order: Sequence[int]) -> bool:
        """Re-plan the buckets for ``order`` (the ready order the process set agreed on).

        Current values move to the new buffers. Returns True when the plan changed; the frontend must
        then re-point its gradients at the new :attr:`views`.
        """
        if self.in_flight:
            raise ShoalError("shoal: rebucket() while buckets are in flight; call finish() first")
        if list(order) == self.order:
            return False
        self._move_to(order)
        return True

    def _move_to(self, order: Sequence[int]) -> None:
        old_views = self.views
        self._build(order)
        for new, old in zip(self.views, old_views):
            new.copy_(old)

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
                                 first_bucket_nbytes=self.first_bucket_nbytes, groups=self.groups)
        if [p.tensor_ids for p in new_plans] == [p.tensor_ids for p in self.plans]:
            return False
        self._move_to(self.order)
        return True

    # ----------------------------------------------------------------------------------- per step
    @property
    def in_flight(self) -> bool:
        """Whether a bucket of this step has been launched and the step not finished."""
        return any(f is not None for f in self._futures)

    @property
    def step_number(self) -> int:
        """The number of the step in progress (1-based; the step owner's count)."""
        return self._steps() + 1

    def pending_futures(self) -> list[torch.futures.Future]:
        """The futures of this step's buckets that have not completed (a failed step's leftovers)."""
        return [f for f in self._futures if f is not None and not f.done()]

    def buckets_in_flight(self) -> list[int]:
        """Buckets launched in this step whose reduction has not completed (for messages)."""
        return [b for b, f in enumerate(self._futures) if f is not None and not f.done()]

    def is_ready(self, i: int) -> bool:
        """Whether tensor ``i`` was marked ready in this step (its value is in its bucket)."""
        return self._ready[i]

    def bucket_pending(self, b: int) -> int:
        """Tensors of bucket ``b`` not yet ready in this step (0: complete, launched or about to be)."""
        return self._pending[b]

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
        loaded = self._calls["on_loaded"]
        if loaded and tensor.is_contiguous():
            self._scale_in_parts(i, loaded, tensor.view(-1))
        else:
            self._scale_into(view, tensor)
            for cb in loaded:
                cb(self, i, view)
        self.mark_ready(i, scaled=True)
        return view

    def _scale_into(self, out: torch.Tensor, value: Optional[torch.Tensor]) -> None:
        """``out = value * load_scale`` (``value`` None: ``out`` in place)."""
        if value is None:
            if self.load_scale != 1.0:
                out.mul_(self.load_scale)
        elif self.load_scale != 1.0:
            torch.mul(value, self.load_scale, out=out)
        else:
            out.copy_(value)

    def _scale_in_parts(self, i: int, loaded: list[Callable], src: Optional[torch.Tensor]) -> None:
        """Constraint 8: scale tensor ``i`` into its view part by part (from the flat ``src``, or in place
        when None), each ``on_loaded`` listener reading the part just written."""
        flat = self.views[i].view(-1)
        for part_of in _load_parts(flat.numel()):
            part = flat[part_of]
            self._scale_into(part, None if src is None else src[part_of])
            for cb in loaded:
                cb(self, i, part)

    def mark_ready(self, i: int, scaled: bool = False) -> None:
        """Tensor ``i`` holds its final local value in ``views[i]`` (already multiplied by
        :attr:`load_scale` when ``scaled``); launch buckets that are complete."""
        if self._ready[i]:
            raise ShoalError(
                f"shoal: gradient of '{self.specs[i].name}' became ready twice in one step on rank "
                f"{runtime.rank()}. HINT: call optimizer.synchronize()/step() between backward passes, or "
                "set backward_passes_per_step to the number of backward passes per step.")
        if not scaled:
            loaded = self._calls["on_loaded"]
            if loaded:
                self._scale_in_parts(i, loaded, None)
            elif self.load_scale != 1.0:
                self.views[i].mul_(self.load_scale)
        self._ready[i] = True
        self._observed.append(i)
        b = self.bucket_of[i]
        self._pending[b] -= 1
        for cb in self._calls["on_ready"]:
            cb(self, i, b)
        if self._pending[b] == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        pending = self._pending
        while self._next_launch < len(self.plans) and pending[self._next_launch] == 0:
            self._launch(self._next_launch)
            self._next_launch += 1

    def _launch(self, b: int) -> None:
        plan = self.plans[b]
        buf = self.buffers[b]
        if self._calls["before_launch"]:
            tensors = lambda plan=plan: [(self.specs[t].name, self.views[t]) for t in plan.tensor_ids]  # noqa: E731
            for cb in self._calls["before_launch"]:
                cb(self, b, buf, tensors)
        ctx = ReduceContext(group=self._streams[b % self.num_streams], process_set=self.process_set,
                            prescale=1.0, postscale=1.0, bucket_index=b,  # applied on load (constraint 6)
                            names=lambda plan=plan: [self.specs[t].name for t in plan.tensor_ids],
                            state=self._bucket_state[b], step=self._steps() + 1,
                            layout=lambda plan=plan: [(off, self.specs[t].shape)
                                                      for t, off in zip(plan.tensor_ids, plan.offsets)])
        epoch = self._epoch

        def launch() -> torch.futures.Future:
            if self._epoch != epoch:  # the step was given up while this bucket waited for its stream
                raise ShoalError(f"shoal: bucket {b} of an abandoned step was not launched")
            return self._algorithm(buf, ctx)

        self._futures[b] = fut = runtime.launch_in_order(ctx.group, launch)  # constraint 4
        for cb in self._calls["after_launch"]:
            cb(self, b, fut)

    def launch_all(self) -> None:
        """Launch every bucket not yet launched; tensors never marked ready go as they are (zeros if the
        frontend zeroed them). Returns at once; :meth:`finish` waits."""
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

    def names_of(self, b: int) -> list[str]:
        """Names of bucket ``b``'s tensors, in bucket order."""
        return [self.specs[t].name for t in self.plans[b].tensor_ids]

    def _wait_buckets(self) -> Optional[BaseException]:
        """Wait for every bucket in launch order. With ``on_done`` listeners, one at a time, telling them
        as each lands while later ones are on the wire. Returns the first exception a listener raised
        (the waits go on); a failed collective is kept in ``_wait_error`` (no more ``on_done`` after it)."""
        done_cbs = self._listeners("on_done")
        waits = self._listeners("before_wait")
        if not done_cbs:
            for cb in waits:
                cb(self, self._futures, self.names_of)
        callback_error: Optional[BaseException] = None
        while self._waited < len(self.plans):
            b = self._waited
            fut = self._futures[b]
            if done_cbs and self._wait_error is None:
                # One bucket at a time, so that on_done runs while later buckets are on the wire. A stall
                # error leaves the bucket not waited for (the cursor stays).
                one = [f if k == b else None for k, f in enumerate(self._futures)]
                for cb in waits:
                    cb(self, one, self.names_of)
            self._waited += 1
            try:
                fut.wait()
            except Exception as exc:  # noqa: BLE001 (converted; finish() raises it)
                if self._wait_error is None:
                    names = self.names_of(b)
                    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                    err = runtime.explain_failure(exc, f"gradient allreduce of bucket {b} ({shown})",
                                                  self.process_set.ranks)
                    err.__cause__ = exc
                    self._wait_error = err
                continue
            if self._wait_error is None and callback_error is None:
                for cb in done_cbs:
                    try:
                        cb(self, b, list(self.plans[b].tensor_ids))
                    except BaseException as exc:  # noqa: BLE001 (re-raised by finish)
                        callback_error = exc
                        break
        return callback_error

    def finish(self) -> None:
        """Launch every bucket not yet launched (:meth:`launch_all`), wait for all, and leave the reduced
        values in :attr:`views`.

        Raises:
            RankFailureError: a peer died or timed out; the message names the bucket's first tensors.
            StallError: an observer's wait (the stall inspector) gave up, naming the missing ranks.
        """
        self.launch_all()
        try:
            callback_error = self._wait_buckets()
        except BaseException:
            self.abandon_step()
            raise
        error = self._wait_error
        self.last_order = list(self._observed)
        step = self._steps() + 1
        self._own_steps += 1
        self._observed = []
        calls = self._calls["on_finish"]
        self._reset_step()
        if error is not None:
            raise error
        if callback_error is not None:
            raise callback_error
        for cb in calls:
            cb(self, step)

    def abandon_step(self) -> None:
        """Give up the step in progress (a wait raised, or the world is gone): its collectives may still
        complete, buckets still waiting for their stream are not launched. The buffers stay (a later step
        overwrites them); the bookkeeping starts a new step."""
        self._observed = []
        self._reset_step()


class TimelineObserver(ReducerObserver):
    """Records the reducer's buckets on the timeline (:mod:`shoal.core.timeline`) while one is running.

    Tracks: ``gradients`` (a bucket from its first ready gradient to its last), ``stream k`` (each bucket
    from launch to completion, stamped by a callback on the backend's thread), ``main`` (the wait in
    ``synchronize()``), ``steps`` (a mark at each step's end). Off, it listens to nothing (constraint 7).
    """

    def __init__(self):
        self._tl: Optional[_timeline.Timeline] = None
        self._fill_ns: dict[int, int] = {}
        self._launched_ns: dict[int, int] = {}
        self._wait_ns = 0

    def wants(self, event: str) -> bool:
        if event == "on_ready":  # asked first, once per step: look the recorder up then
            self._tl = _timeline.active()
            self._fill_ns.clear()
        return self._tl is not None

    def on_ready(self, reducer: GradientReducer, i: int, bucket: int) -> None:
        now = self._tl.now_ns()
        start = self._fill_ns.setdefault(bucket, now)
        if reducer.bucket_pending(bucket) == 0:
            self._tl.complete("wait_for_gradients", f"fill b{bucket}", start, now, "gradients",
                              {"bucket": bucket, "step": reducer.step_number,
                               "tensors": len(reducer.plans[bucket].tensor_ids)})

    def before_launch(self, reducer: GradientReducer, bucket: int, buffer: torch.Tensor,
                      tensors: TensorsOf) -> None:
        self._launched_ns[bucket] = self._tl.now_ns()

    def after_launch(self, reducer: GradientReducer, bucket: int, future: torch.futures.Future) -> None:
        tl = self._tl
        stream = bucket % reducer.num_streams
        start = self._launched_ns.get(bucket, tl.now_ns())
        args = {"bucket": bucket, "step": reducer.step_number, "stream": stream,
                "nbytes": reducer.plans[bucket].nbytes, "tensors": len(reducer.plans[bucket].tensor_ids),
                "algorithm": reducer.compression}

        def done(_fut) -> None:
            tl.complete("communication", f"allreduce b{bucket}", start, tl.now_ns(), f"stream {stream}", args)

        future.add_done_callback(done)

    def before_wait(self, reducer: GradientReducer, futures, names_of) -> None:
        if not self._wait_ns:
            self._wait_ns = self._tl.now_ns()

    def on_finish(self, reducer: GradientReducer, step: int) -> None:
        tl = self._tl
        if self._wait_ns:
            tl.complete("synchronize", "wait for buckets", self._wait_ns, tl.now_ns(), "main", {"step": step})
        self._wait_ns = 0
        tl.mark_step(step)

