"""``DistributedOptimizer``: Horovod's optimizer wrapper, on Shoal's gradient engine.

Design constraints:

1. A horovod.torch user changes only the import: same constructor, ``synchronize()``,
   ``skip_synchronize()``, ``zero_grad()``, the clipping, AMP GradScaler and gradient-accumulation patterns.
   The wrapper is a real ``torch.optim.Optimizer`` (LR schedulers check ``isinstance``) that shares the
   wrapped optimizer's ``param_groups`` and ``state``; no class is built at run time.
2. Zero copies in steady state: each gradient is a view into the engine's bucket buffers. ``zero_grad``
   zeroes the buffers instead of dropping the views. If user code sets ``.grad = None`` anyway, the next
   gradient is copied into its view once and the view is put back.
3. Step 1 discovers: which parameters get gradients, in which order (the bucket plan follows the real
   ready order, agreed from the process set's first rank), and which produce sparse gradients. From
   step 2 on, buckets go on the wire during backward.
4. World size 1 costs nothing: no hooks, ``step`` is the wrapped optimizer's step.
5. Parameters marked ``_shoal_no_sync = True`` (e.g. a class-sharded classifier, :mod:`shoal.parallel`)
   are never reduced: their gradients are local by design.
6. The step may overlap the wire (``overlap_step``, opt-in): in ``step()``, each bucket's parameters
   are stepped the moment that bucket is reduced, while later buckets are still in flight (only for the
   element-wise ``torch.optim`` classes in :data:`_OVERLAP_SAFE`, with no step hooks, no closure,
   ``nan_check`` off, so the result is bitwise the same as one step after the last bucket).
7. The cross-barrier (:func:`cross_barrier`, opt-in) goes one further: the engine defers the head of
   some early buckets (the layers whose forward comes last) to the end of the wire; ``step()`` reduces,
   negotiates and steps everything else and returns with those heads in flight; each module's forward
   pre-hook then waits for (and steps) its own deferred parameters, so the next forward's first layers run
   while the wire is still busy. Every collective of a step is issued inside that ``step()`` on every rank,
   so what is left for the forward is waiting only (no collective there could meet one of the user's).
   Same optimizers as constraint 6, bitwise the same result (the deferred updates use the hyper-parameters
   of their own step, and the reduced views as gradients); every other read or write of the weights goes
   through :meth:`DistributedOptimizer.flush` (the model's forward end, ``state_dict()``,
   ``load_state_dict()``, ``step()``, ``synchronize()``, the next gradient). The autotuner is off under it.

What lives elsewhere: bucketing, streams and collectives (:class:`shoal.core.reducer.GradientReducer`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from shoal.core import runtime
from shoal.core.buckets import TensorSpec
from shoal.core.checks import apply_nan_policy
from shoal.core.compression import Compression, resolve_compression
from shoal.core.errors import ShoalError
from shoal.core.negotiation import Negotiator
from shoal.core.reducer import GradientReducer, ReduceOp, check_engine_options
from shoal.core import autotune as _autotune
from shoal.core import timeline as _timeline

__all__ = ["DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "cross_barrier",
           "CrossBarrier"]

log = logging.getLogger(__name__)

#: Optimizers whose update of a parameter reads only that parameter, its gradient and its own state, so
#: that stepping the parameters bucket by bucket equals one step over all of them (constraint 6).
#: Exact classes: a subclass may override ``step`` with something global (e.g. a norm over all gradients).
_OVERLAP_SAFE = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam", "ASGD", "Rprop")
    if hasattr(torch.optim, name))


def _op_name(op) -> str:
    """Map Horovod-style op constants (objects, enums or strings) to the engine's names."""
    if op is None:
        return ReduceOp.AVERAGE
    name = str(getattr(op, "name", op)).lower()
    if name in ("average", "avg", "mean"):
        return ReduceOp.AVERAGE
    if name == "sum":
        return ReduceOp.SUM
    raise ValueError(f"shoal: DistributedOptimizer supports op=Average or Sum, got {op!r}")


def _collective_settings(compression: Optional[str], groups: Optional[Sequence[Sequence[int]]],
                         backward_passes_per_step: int, engine_options: dict) -> dict:
    """This optimizer's resolved settings that decide which collectives its steps run (bucket layout,
    streams, wire format, hierarchy, when buckets launch, the autotuner's trials), as the reducer and the
    autotuner will resolve them: ranks must agree on them (shoal.core.negotiation, constraint 7)."""
    cfg = runtime.config()
    given = {k: v for k, v in engine_options.items() if v is not None}
    # What the autotuner leaves alone (it tunes the rest with allreduces of its own, autotune.py).
    fixed = sorted(_autotune.fixed_by_user(cfg, given) & {"fusion_threshold_mb", "num_streams"})
    return {"fusion_threshold_mb": float(given.get("fusion_threshold_mb") or cfg.fusion_threshold_mb),
            "first_bucket_mb": float(given.get("first_bucket_mb") or cfg.first_bucket_mb),
            "num_streams": int(given.get("num_streams") or cfg.num_streams),
            "compression": compression or cfg.compression,
            "hierarchical": given.get("hierarchical") or cfg.hierarchical,
            "groups": "none" if groups is None else repr([list(g) for g in groups]),
            "backward_passes_per_step": int(backward_passes_per_step),
            "autotune": ("on" + (f", fixed: {', '.join(fixed)}" if fixed else "")) if cfg.autotune else "off"}


class DistributedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that ``step()`` applies gradients averaged across ranks.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        named_parameters: ``model.named_parameters()``; names appear in error messages. Default: the
            optimizer's parameters, named ``param.<group>.<index>``.
        compression: ``Compression.none`` / ``.fp16`` / ``.bf16`` / ``.mixed_fp16`` / ``.mixed_bf16``
            (wire format of buckets; see docs/compression.md).
        backward_passes_per_step: backward passes to accumulate locally before reducing.
        op: ``Average`` (default) or ``Sum``.
        gradient_predivide_factor: divide by this before the sum and by ``size/factor`` after
            (Horovod's meaning; only with Average).
        groups: explicit buckets: a list of lists of parameters, or an int (that many buckets).
        sparse_as_dense: reduce sparse gradients as dense tensors (else: allgather of indices and values).
        process_set: ranks to average over (default: all).
        **engine_options: ``fusion_threshold_mb``, ``first_bucket_mb``, ``num_streams``,
            ``hierarchical``, ``error_feedback``, ``nan_check`` (raise / skip / warn / off, see docs/nan_check.md),
            ``overlap_step`` (step each bucket's parameters as soon as it is reduced; see docs/engine.md):
            override the runtime config for this optimizer.

    Example:
        >>> opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                named_parameters=model.named_parameters())
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters=None,
                 compression=Compression.none, backward_passes_per_step: int = 1, op=None,
                 gradient_predivide_factor: float = 1.0, groups=None, sparse_as_dense: bool = False,
                 process_set: Optional[runtime.ProcessSet] = None, **engine_options):
        # Deliberately not calling Optimizer.__init__: this object is a view of `optimizer`.
        self._inner = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._process_set = runtime.get_process_set(process_set, "DistributedOptimizer")
        if backward_passes_per_step < 1:
            raise ValueError(f"shoal: backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self.backward_passes_per_step = int(backward_passes_per_step)
        self._op = _op_name(op)
        if gradient_predivide_factor != 1.0 and self._op != ReduceOp.AVERAGE:
            raise ValueError("shoal: gradient_predivide_factor needs op=Average")
        self._prescale = 1.0 / gradient_predivide_factor
        self._postscale = gradient_predivide_factor
        self._compression = resolve_compression(compression)
        self._sparse_as_dense = sparse_as_dense
        if "num_groups" in engine_options:  # Horovod's older spelling of groups=<int>
            num_groups = engine_options.pop("num_groups")
            if num_groups:  # 0, Horovod's default, means "not given"
                if groups is not None:
                    raise ValueError("shoal: give groups= or num_groups=, not both (num_groups is Horovod's "
                                     "older name for groups=<int>)")
                groups = num_groups
        #: Step bucket by bucket while later buckets are on the wire (constraint 6); None: the config's.
        self.overlap_step: Optional[bool] = engine_options.pop("overlap_step", None)
        check_engine_options(engine_options, "DistributedOptimizer")  # now, not when step 1 builds the reducer
        self._engine_options = engine_options
        #: Steps skipped on every rank by ``nan_check="skip"`` (steps a GradScaler skipped are its own).
        self.skipped_steps = 0

        self._params, self._names = self._name_parameters(named_parameters)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._groups = self._resolve_groups(groups)
        self._counts = [0] * len(self._params)
        self._reducer: Optional[GradientReducer] = None
        self._tuner: Optional[_autotune.Autotuner] = None  # bucket size / streams (shoal.core.autotune)
        self._dense_ids: list[int] = []     # param index of reducer tensor j
        self._slot: dict[int, int] = {}     # param index -> reducer tensor j
        self._sparse_ids: set[int] = set()
        self._seen_order: list[int] = []    # step-1 ready order (param indices)
        self._synchronized = False
        self._should_synchronize = True
        self._hooks = []
        #: The cross-barrier (constraint 7): its CrossBarrier handle, or None when off.
        self._cross_barrier: Optional["CrossBarrier"] = None
        #: A step whose reduction and update are still in flight (constraint 7), or None.
        self._deferred: Optional[dict] = None
        world = self._process_set.size()
        self._active = world > 1 or self._prescale * self._postscale != 1.0 or self._op == ReduceOp.SUM
        self._active = self._active and self._process_set.included()
        # Registration check (collective: every argument is validated above) and per-step negotiation.
        self._negotiator = Negotiator([(n, tuple(p.shape), p.dtype) for n, p in zip(self._names, self._params)],
                                      self._process_set, owner=self,
                                      nan_check=engine_options.get("nan_check"),
                                      settings=_collective_settings(self._compression, self._groups,
                                                                    self.backward_passes_per_step,
                                                                    engine_options)) if self._active else None
        if self._active:
            for i, p in enumerate(self._params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))

    # ------------------------------------------------------------------------- optimizer façade
    @property
    def param_groups(self):
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self._inner.param_groups = value

    @property
    def state(self):
        return self._inner.state

    @state.setter
    def state(self, value):
        self._inner.state = value

    @property
    def defaults(self):
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value):
        self._inner.defaults = value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    def register_step_pre_hook(self, hook):
        """Registered on the wrapped optimizer, whose ``step`` runs it (after the gradients are reduced)."""
        return self._inner.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self._inner.register_step_post_hook(hook)

    def state_dict(self):
        self.flush()
        return self._inner.state_dict()

    def load_state_dict(self, state_dict):
        self.flush()
        return self._inner.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        raise ShoalError("shoal: add_param_group on a DistributedOptimizer is not supported yet. HINT: "
                         "add the group to the inner optimizer before wrapping it.")

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._inner!r})"

    def __getstate__(self):
        raise TypeError("shoal: a DistributedOptimizer cannot be pickled; save state_dict() instead")

    # ------------------------------------------------------------------------- set-up helpers
    def _name_parameters(self, named_parameters):
        opt_params = [p for g in self._inner.param_groups for p in g["params"]]
        if named_parameters is None:
            named = [(f"param.{gi}.{pi}", p) for gi, g in enumerate(self._inner.param_groups)
                     for pi, p in enumerate(g["params"])]
        else:
            named = list(named_parameters)
            if named and not isinstance(named[0], tuple):
                raise ValueError("shoal: named_parameters must be (name, parameter) pairs, e.g. "
                                 "model.named_parameters()")
            names = [n for n, _ in named]
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                raise ValueError(f"shoal: parameter names are not unique: {dups[:5]}")
            named_ids = {id(p) for _, p in named}
            unnamed = [p for p in opt_params if id(p) not in named_ids]
            if unnamed:
                raise ValueError(
                    f"shoal: named_parameters was given, but {len(unnamed)} of the optimizer's parameters "
                    f"are not in it (first shape: {tuple(unnamed[0].shape)}). HINT: pass "
                    "model.named_parameters() of the model whose parameters the optimizer holds.")
        opt_ids = {id(p) for p in opt_params}
        params, names, seen = [], [], set()
        for name, p in named:
            if id(p) in seen or id(p) not in opt_ids:
                continue  # tied weights appear once; parameters the optimizer does not hold are ignored
            seen.add(id(p))
            if not p.requires_grad or getattr(p, "_shoal_no_sync", False):
                continue
            params.append(p)
            names.append(name)
        return params, names

    def _resolve_groups(self, groups) -> Optional[list[list[int]]]:
        if groups is None:
            return None
        if isinstance(groups, int):
            if groups < 1:
                raise ValueError(f"shoal: groups must be >= 1, got {groups}")
            n = len(self._params)
            return [list(range(i, n, groups)) for i in range(min(groups, n))]
        out = []
        for g in groups:
            ids = []
            for p in g:
                if id(p) not in self._index:
                    raise ValueError("shoal: groups= holds a parameter the optimizer does not reduce")
                ids.append(self._index[id(p)])
            out.append(ids)
        grouped = {i for g in out for i in g}
        rest = [i for i in range(len(self._params)) if i not in grouped]
        return out + ([rest] if rest else [])

    # ------------------------------------------------------------------------- hooks
    def _make_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            self._on_grad_ready(i, param)
        return hook

    def _on_grad_ready(self, i: int, p: torch.Tensor) -> None:
        if self._deferred is not None:  # a backward without the hooked forward: finish the last step first
            self.flush()
        if not self._should_synchronize and self._synchronized:
            return
        self._counts[i] += 1
        need = self.backward_passes_per_step * self._negotiator.fires(i)  # > 1: reentrant checkpointing
        if self._counts[i] != need:
            if self._counts[i] > need:  # fired again after it was marked ready (shoal.core.negotiation)
                j = self._slot.get(i)
                bucket = None if self._reducer is None or j is None else self._reducer.bucket_of[j]
                self._negotiator.note_extra_firing(i, self._counts[i], self.backward_passes_per_step, bucket)
            return
        if self._synchronized:
            # A backward after a synchronize() whose step() never ran: AMP's GradScaler skips step() on
            # overflow. As in Horovod, that starts a new step.
            self._synchronized = False
        if self._reducer is None:
            if self._counts[i] == self.backward_passes_per_step:
                self._seen_order.append(i)
            return
        j = self._slot.get(i)
        if j is None:
            return  # a sparse gradient: reduced in synchronize()
        if p.grad is None:
            return
        # A fresh gradient (after zero_grad(set_to_none=True)) is copied in with the 1/n fused; one that
        # accumulated in place in its view is scaled there (GradientReducer.load).
        p.grad = self._reducer.load(j, p.grad)

    # ------------------------------------------------------------------------- the step
    def _build_reducer(self) -> None:
        """End of step 1: agree on order and sparse set, build buckets, move gradients into views."""
        sparse_here = sorted(i for i, p in enumerate(self._params)
                             if p.grad is not None and p.grad.is_sparse and not self._sparse_as_dense)
        box = [(self._seen_order, sparse_here)]
        dist.broadcast_object_list(box, src=self._process_set.ranks[0], group=self._process_set.group)
        order, sparse = box[0]
        self._sparse_ids = set(sparse)
        seen = set(order)
        full_order = [i for i in order if i not in self._sparse_ids] + [
            i for i in range(len(self._params) - 1, -1, -1) if i not in seen and i not in self._sparse_ids]
        self._dense_ids = sorted(full_order)
        self._slot = {i: j for j, i in enumerate(self._dense_ids)}
        specs = [TensorSpec(self._names[i], tuple(self._params[i].shape), self._params[i].dtype,
                            self._params[i].device) for i in self._dense_ids]
        groups = None
        if self._groups is not None:
            groups = [[self._slot[i] for i in g if i in self._slot] for g in self._groups]
            groups = [g for g in groups if g]
        self._reducer = GradientReducer(
            specs, op=self._op, prescale_factor=self._prescale, postscale_factor=self._postscale,
            process_set=self._process_set, compression=self._compression, groups=groups,
            negotiator=self._negotiator, **self._engine_options)
        order_slots = [self._slot[i] for i in full_order]
        self._reducer.rebucket(order_slots)
        # The tuner re-plans buckets between steps; under the cross-barrier a step ends in the next forward.
        self._tuner = None if self._cross_barrier is not None else \
            _autotune.make_autotuner(self._reducer, self._engine_options)
        if self._cross_barrier is not None:
            self._reducer.set_defer_fraction(self._cross_barrier.defer_fraction)
        for j, i in enumerate(self._dense_ids):
            p = self._params[i]
            p.grad = self._reducer.load(j, p.grad)  # None: the (zero) view as it is

    def synchronize(self) -> None:
        """Wait until every gradient is reduced (launching what is not yet on the wire).

        After this, ``param.grad`` holds the averaged gradient on every rank; call ``step()`` inside
        ``with optimizer.skip_synchronize():`` to avoid a second synchronization (e.g. after clipping).
        """
        if self._deferred is not None:  # the last step's update is still in flight: it is the answer
            self.flush()
            return
        if not self._active:
            self._synchronized = True
            return
        if self._synchronized:
            return
        if self._reducer is None:
            self._build_reducer()
        else:
            self._prepare_views()
        self._complete_synchronize()

    def _prepare_views(self) -> None:
        """Every reduced gradient in its view before the rest of the buckets go on the wire."""
        for j, i in enumerate(self._dense_ids):
            p = self._params[i]
            view = self._reducer.views[j]
            if p.grad is None:
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad.to_dense() if p.grad.is_sparse else p.grad)
                p.grad = view

    def _complete_synchronize(self) -> None:
        """Wait for the buckets (``reducer.tensors_done`` steps them as they come), negotiate, re-plan."""
        # reducer.finish() plus the per-step negotiation: which gradients no rank produced.
        none_have = self._negotiator.finish(self._reducer, self._counts, sorted(self._sparse_ids))
        if self._sparse_ids:
            self._reduce_sparse()
        for i in none_have:  # unused on every rank: no gradient, as in single-process training
            self._params[i].grad = None
        if self._tuner is not None and self._tuner.end_step():  # new bucket plan: values moved already
            for j, i in enumerate(self._dense_ids):
                if self._params[i].grad is not None:
                    self._params[i].grad = self._reducer.views[j]
        self._counts = [0] * len(self._params)
        self._synchronized = True

    def _reduce_sparse(self) -> None:
        """Sparse gradients: allgather indices and values (sizes differ per rank), then coalesce."""
        group, n = self._process_set.group, self._process_set.size()
        for i in sorted(self._sparse_ids):
            p = self._params[i]
            g = p.grad.coalesce() if p.grad is not None else torch.sparse_coo_tensor(
                torch.empty((p.dim(), 0), dtype=torch.long), torch.empty((0,) + p.shape[1:], dtype=p.dtype),
                p.shape)
            idx, val = g.indices(), g.values()
            counts = [None] * n
            dist.all_gather_object(counts, idx.shape[1], group=group)
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
            scale = self._prescale * self._postscale / (n if self._op == ReduceOp.AVERAGE else 1)
            p.grad = torch.sparse_coo_tensor(idx, val * scale, p.shape).coalesce()

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Inside this block ``step()`` does not synchronize (use after an explicit ``synchronize()``)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        """Synchronize (unless inside ``skip_synchronize()``), then the wrapped optimizer's step.

        Where it is exact (constraint 6), the parameters of each bucket are stepped as soon as that
        bucket is reduced, while the later buckets are still on the wire."""
        stepped: Optional[set[int]] = None
        if self._deferred is not None:  # two step() calls with no forward between them
            self.flush()
        if self._should_synchronize:
            if self._synchronized and self._active:
                warnings.warn("shoal: optimizer.step() after optimizer.synchronize() without "
                              "skip_synchronize(): the gradients are already reduced, nothing is redone.",
                              stacklevel=2)
            elif closure is None and self._cross_barrier is not None and self._can_step_in_parts() \
                    and self._can_defer():
                return self._defer_step()
            elif closure is None and self._can_overlap_step():
                stepped = set()
                # Parameter -> its group, once per step: each bucket then steps only its own parameters.
                group_of = {id(p): k for k, g in enumerate(self._inner.param_groups) for p in g["params"]}
                self._reducer.tensors_done = lambda ids: self._step_tensors(ids, stepped, group_of)
            try:
                self.synchronize()
            finally:
                if self._reducer is not None:
                    self._reducer.tensors_done = None  # finish() consumed it, unless it never ran
        elif self._active and not self._synchronized:
            raise ShoalError("shoal: step() under skip_synchronize() but synchronize() was not called "
                             "this step: gradients would be applied unreduced. HINT: call "
                             "optimizer.synchronize() first.")
        try:
            # NaN/Inf policy (shoal.core.checks): raises, or True on every rank alike for "skip".
            if self._reducer is not None and self._active and apply_nan_policy(self._reducer.nan_report):
                self.skipped_steps += 1
                return None
            with _timeline.span("optimizer", "optimizer step"):
                if stepped is not None:  # what no bucket stepped
                    self._step_subset([[p for p in g["params"] if id(p) not in stepped]
                                       for g in self._inner.param_groups])
                    return None
                return self._inner.step(closure) if closure is not None else self._inner.step()
        finally:
            self._synchronized = False

    def _can_overlap_step(self) -> bool:
        """Whether ``step()`` may step bucket by bucket (constraint 6)."""
        if not (self.overlap_step if self.overlap_step is not None else runtime.config().overlap_step):
            return False
        return self._can_step_in_parts()

    def _can_step_in_parts(self) -> bool:
        """Whether stepping the parameters in parts equals one step over all (constraints 6 and 7)."""
        red = self._reducer
        if red is None or not self._active or red.nan_check is not None or self._synchronized:
            return False
        if type(self._inner) not in _OVERLAP_SAFE:
            return False
        from torch.optim import optimizer as _torch_optimizer
        hooks = (self._inner._optimizer_step_pre_hooks, self._inner._optimizer_step_post_hooks,
                 getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None),
                 getattr(_torch_optimizer, "_global_optimizer_post_hooks", None))
        return not any(hooks)

    def _step_tensors(self, ids: list[int], stepped: set[int], group_of: dict[int, int]) -> None:
        """The reducer's tensors ``ids`` are reduced: step the parameters among them that this rank produced
        a gradient for (a gradient no rank produced is dropped after the last bucket, so those wait for the
        final step)."""
        subsets: list[list[torch.Tensor]] = [[] for _ in self._inner.param_groups]
        for t in ids:
            i = self._dense_ids[t]
            p = self._params[i]
            k = group_of.get(id(p))
            if k is not None and self._counts[i] > 0 and p.grad is not None:
                subsets[k].append(p)
                stepped.add(id(p))
        if any(subsets):
            b = self._reducer.bucket_of[ids[0]]
            with _timeline.span("optimizer", f"optimizer step b{b}", "main", {"bucket": b, "tensors": len(ids)}):
                self._step_subset(subsets)

    # ------------------------------------------------------------------------- cross-barrier (constraint 7)
    def _can_defer(self) -> bool:
        """Whether this step may leave the deferred heads in flight: every collective of the step is then
        issued inside ``step()`` on every rank alike, and what is left for the next forward is waiting only
        (no collective there that could meet a user's collective of that forward on another rank)."""
        red = self._reducer
        return red is not None and self._tuner is None and red._first_deferred < len(red.units)

    def _defer_step(self) -> None:
        """``step()`` under the cross-barrier: reduce and step everything but the deferred heads (stepping
        each tensor as its unit lands), negotiate, and return with the heads on the wire; the next forward's
        pre-hooks (or :meth:`flush`) wait for them and step their parameters."""
        red = self._reducer
        groups = self._inner.param_groups
        group_of = {id(p): k for k, g in enumerate(groups) for p in g["params"]}
        pending = {t for u in range(red._first_deferred, len(red.units)) for t in red.done_at[u]}
        stepped: set[int] = set()
        red.tensors_done = lambda ids: self._step_tensors(ids, stepped, group_of)
        red.leave_deferred = True
        try:
            self._prepare_views()
            self._complete_synchronize()  # waits up to the deferred heads; negotiation, none-have
        except BaseException:
            red.tensors_done = None
            if red.in_flight:  # the negotiation failed after the reducer returned: close its step too
                with contextlib.suppress(Exception):
                    red.finish()
            raise
        finally:
            red.leave_deferred = False
        # A gradient no rank produced was dropped (param.grad None): not stepped, as in the plain step.
        waiting = {id(p) for p in (self._params[self._dense_ids[t]] for t in pending) if p.grad is not None}
        with _timeline.span("optimizer", "optimizer step"):
            self._step_subset([[p for p in g["params"] if id(p) not in stepped and id(p) not in waiting]
                               for g in groups])
        # The update of the rest runs later with this step's hyper-parameters (an LR scheduler may step
        # in between) and with the reduced gradients in the views (zero_grad may drop param.grad).
        hyper = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
                 for g in groups]
        self._deferred = {"waiting": waiting, "stepped": stepped}
        red.tensors_done = lambda ids: self._step_deferred(ids, stepped, group_of, hyper)
        self._synchronized = False

    def _step_deferred(self, ids: list[int], stepped: set[int], group_of: dict[int, int],
                       hyper: list[dict]) -> None:
        """Deferred tensors ``ids`` are reduced: step their parameters with the hyper-parameters of the
        step they belong to, their views as gradients, outside any inference mode of the caller."""
        red = self._reducer
        subsets: list[list[torch.Tensor]] = [[] for _ in self._inner.param_groups]
        swapped: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        for t in ids:
            p = self._params[self._dense_ids[t]]
            k = group_of.get(id(p))
            if k is None or id(p) in stepped:
                continue
            swapped.append((p, p.grad))
            p.grad = red.views[t]
            subsets[k].append(p)
            stepped.add(id(p))
        if not swapped:
            return
        groups = self._inner.param_groups
        current = [{k: g[k] for k in h} for g, h in zip(groups, hyper)]
        try:
            with torch.inference_mode(False), _timeline.span("optimizer", "optimizer step (deferred)"):
                for g, h in zip(groups, hyper):
                    g.update(h)
                self._step_subset(subsets)
        finally:
            for g, c in zip(groups, current):
                g.update(c)
            for p, grad in swapped:
                p.grad = grad

    def _before_forward(self, module: torch.nn.Module) -> None:
        """A module's forward pre-hook: its own parameters are reduced and stepped before it runs."""
        d = self._deferred
        if d is None:
            return
        red = self._reducer
        for p in module._parameters.values():
            if p is None or id(p) not in d["waiting"] or id(p) in d["stepped"]:
                continue
            if not red.wait_for(self._slot[self._index[id(p)]]) or id(p) not in d["stepped"]:
                self.flush()  # raises the collective's error
                return
        if red.units_left == 0:
            self.flush()

    def flush(self) -> None:
        """Finish a step that the cross-barrier left in flight: wait for the deferred heads and step their
        parameters (waiting only: every rank launched them in its ``step()``). Needed before reading those
        weights outside the model's forward (e.g. ``p.data``, ``torch.save(model)``); ``state_dict()``,
        ``load_state_dict()``, ``step()``, ``synchronize()``, ``zero_grad(set_to_none=False)``, the end of the
        model's forward and the next backward call it already. Nothing to do otherwise."""
        if self._deferred is None:
            return
        self._deferred = None
        try:
            self._reducer.finish()  # steps what lands now (tensors_done), closes the reducer's step
        finally:
            self._reducer.tensors_done = None

    def _step_subset(self, subsets: list[list[torch.Tensor]]) -> None:
        """The wrapped optimizer's step over ``subsets[k]`` of each parameter group ``k`` (their state,
        groups and hyper-parameters as they are); nothing runs when none of them has a gradient."""
        if not any(p.grad is not None for ps in subsets for p in ps):
            return
        groups = self._inner.param_groups
        saved = [g["params"] for g in groups]
        try:
            for g, ps in zip(groups, subsets):
                g["params"] = ps
            self._inner.step()
        finally:
            for g, ps in zip(groups, saved):
                g["params"] = ps

    @property
    def autotune_summary(self) -> Optional[dict]:
        """What the bucket-size / stream-count tuner did (state ``"tuning"`` or ``"settled"``, the choice,
        every trial), the same on every rank; None when the tuner is off or the first step has not run."""
        return self._tuner.summary() if self._tuner is not None else None

    @property
    def nan_report(self):
        """The :class:`~shoal.core.checks.NonFiniteReport` of the last synchronization; None when every
        gradient of every rank was finite (or ``nan_check`` is off)."""
        return self._reducer.nan_report if self._reducer is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, as ``torch.optim.Optimizer.zero_grad`` does.

        ``set_to_none=True`` (the default) is the cheaper one here too: autograd then hands over fresh
        gradients, which enter their buckets in one fused copy-and-scale pass. With ``False`` the views
        into the buckets are zeroed in place and autograd accumulates into them (a zeroing pass plus an
        add per step: measured slower)."""
        if self._deferred is not None and not set_to_none:  # in place would hit buffers still on the wire
            self.flush()  # (set_to_none is fine: the deferred updates read their views, not param.grad)
        # _counts, not the reducer's ready flags: they also cover step 1 (no reducer yet) and the first
        # backward passes of backward_passes_per_step > 1 (counted but not yet marked ready).
        if any(self._counts) and not self._synchronized:
            raise ShoalError("shoal: optimizer.zero_grad() was called after loss.backward() but before "
                             "optimizer.step() or optimizer.synchronize(). HINT: zero the gradients "
                             "before backward, or step first.")
        managed = set()
        if self._reducer is not None and not set_to_none:
            for buf in self._reducer.buffers:
                buf.zero_()
            managed = {id(self._params[i]) for i in self._slot}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in managed or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()
        self._counts = [0] * len(self._params)
        self._synchronized = False


class CrossBarrier:
    """Handle of :func:`cross_barrier`: ``remove()`` finishes any step in flight and takes the hooks off."""

    def __init__(self, model: torch.nn.Module, optimizer: DistributedOptimizer, defer_fraction: float):
        self.model, self.optimizer, self.defer_fraction = model, optimizer, float(defer_fraction)
        self._handles: list = []

    def _install(self) -> None:
        opt = self.optimizer
        owned = 0
        for module in self.model.modules():
            if any(p is not None and id(p) in opt._index for p in module._parameters.values()):
                self._handles.append(module.register_forward_pre_hook(
                    lambda mod, _args: opt._before_forward(mod)))
                owned += 1
        if not owned:
            raise ShoalError("shoal: cross_barrier(): none of the model's modules owns a parameter of this "
                             "optimizer. HINT: pass the model whose parameters the optimizer was built on.")
        # Whatever no module's pre-hook waited for is done before the backward (and before a checkpoint).
        self._handles.append(self.model.register_forward_hook(lambda _m, _a, _o: opt.flush()))
        self._handles.append(self.model.register_state_dict_pre_hook(lambda *_a, **_k: opt.flush()))
        # A load would otherwise be overwritten by the update still in flight.
        self._handles.append(self.model.register_load_state_dict_pre_hook(lambda *_a, **_k: opt.flush()))

    def remove(self) -> None:
        """Finish the step in flight and restore the plain step (one wait in ``step()``)."""
        self.optimizer.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.optimizer._cross_barrier = None
        if self.optimizer._reducer is not None:
            self.optimizer._reducer.set_defer_fraction(0.0)


def cross_barrier(model: torch.nn.Module, optimizer: DistributedOptimizer, *,
                  defer_fraction: float = 0.1) -> CrossBarrier:
    """Overlap the end of each step's communication with the next forward (constraint 7; BytePS's idea).

    The engine moves the head of some early buckets (``defer_fraction`` of the gradient bytes, from the
    layers whose forward comes last) to the end of the wire. ``optimizer.step()`` returns once everything
    else is reduced and stepped, with those heads in flight; each module of ``model`` waits, just before its
    forward, for its own deferred parameters and steps them. The result is bitwise the same as the plain
    step (an LR scheduler stepping in between does not leak into the deferred update).

    Requirements (else a :class:`~shoal.core.errors.ShoalError` now, or that step runs the plain way): an
    element-wise ``torch.optim`` optimizer (SGD, Adam, AdamW, ... exactly, not a subclass), no step hooks,
    ``nan_check`` off, ``step()`` without a closure; each parameter is used by the module that owns it (a
    module reading another module's weight directly, before that module's forward, would see last step's
    value). The autotuner is off under it: bucket size and streams come from the config (``1`` MB buckets
    suit it, docs/engine.md). Weights read outside the model's forward need
    :meth:`DistributedOptimizer.flush` first; ``model.state_dict()``, ``model.load_state_dict()``,
    ``optimizer.state_dict()``, the end of the model's forward and the next backward flush already.

    Args:
        model: the module whose forward runs next (its submodules get the pre-hooks).
        optimizer: a :class:`DistributedOptimizer` over (some of) ``model``'s parameters.
        defer_fraction: share of the gradient bytes launched last, in [0, 1). 0.1 (default): enough on
            the benchmark MLP over 1 Gbit/s to cover the first layers' forward (docs/engine.md).

    Returns:
        A :class:`CrossBarrier`; ``.remove()`` turns it off.

    Example:
        >>> opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                named_parameters=model.named_parameters())
        >>> hvd.cross_barrier(model, opt)
        >>> for x, y in batches:
        ...     opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        >>> opt.flush()   # before reading weights directly
    """
    if not isinstance(optimizer, DistributedOptimizer):
        raise TypeError(f"shoal: cross_barrier() needs a shoal DistributedOptimizer, got {type(optimizer).__name__}")
    if optimizer._cross_barrier is not None:
        raise ShoalError("shoal: cross_barrier() is already on for this optimizer. HINT: call .remove() on "
                         "the handle it returned first.")
    if type(optimizer.optimizer) not in _OVERLAP_SAFE:
        raise ShoalError(
            f"shoal: cross_barrier() steps parameters module by module, which equals one step only for the "
            f"element-wise torch.optim classes ({', '.join(c.__name__ for c in _OVERLAP_SAFE)}); got "
            f"{type(optimizer.optimizer).__name__}. HINT: use the plain step (no cross_barrier).")
    if not 0.0 <= defer_fraction < 1.0:
        raise ValueError(f"shoal: cross_barrier(defer_fraction=...) must be in [0, 1), got {defer_fraction}")
    handle = CrossBarrier(model, optimizer, defer_fraction)
    optimizer.flush()
    if optimizer._active:
        handle._install()
        optimizer._cross_barrier = handle
        optimizer._tuner = None  # constraint 7: bucket size and streams from the config
        if optimizer._reducer is not None:
            optimizer._reducer.set_defer_fraction(defer_fraction)
    return handle


def _no_sync_matcher():
    """``tensor -> bool`` for parameters marked ``_shoal_no_sync`` (also their ``state_dict()`` copies,
    matched by storage through the registry of :mod:`shoal.parallel.no_sync`)."""
    from shoal.parallel.no_sync import no_sync_matcher  # noqa: PLC0415 (the mark's owner)

    return no_sync_matcher()


def _check_same_tensors(what: str, entries: list[tuple], ps: runtime.ProcessSet) -> None:
    """Raise the same MismatchError on every rank unless every rank passes the same ``entries``.

    ``entries`` are ``(name, shape, description)`` as :func:`shoal.core.negotiation.check_registration`
    takes them (the description stands where it expects the dtype: dtype, device, group; or "sharded").
    torch.distributed trusts the caller's sizes, so a model built differently on one rank would otherwise
    broadcast into the wrong tensors, or fail inside gloo with a size error that names neither the tensor
    nor the rank. The registration check costs one 16-byte allreduce whatever the number of tensors; the
    lists travel only on a mismatch. Skipped with ``check_collectives`` off, like every other check of
    the collectives.
    """
    from shoal.core.errors import MismatchError  # noqa: PLC0415
    from shoal.core.negotiation import check_registration  # noqa: PLC0415

    if ps.size() == 1 or not runtime.config().check_collectives:
        return
    try:
        check_registration(entries, ps, what=what)
    except MismatchError as exc:
        # The same text on every rank (check_registration's is), plus what only a broadcast needs to say.
        raise MismatchError(
            f"{exc} A parameter that is sharded on purpose (different on every rank) must carry the no-sync "
            "mark on every rank (shoal.parallel.mark_no_sync(param); PartialFC marks its weight itself); "
            "broadcasts then skip it.") from None


def _describe(t: torch.Tensor) -> str:
    """What :func:`_check_same_tensors` compares besides the shape (messages print it before the shape)."""
    return f"{str(t.dtype).replace('torch.', '')} on {t.device.type}"


def broadcast_parameters(params, root_rank: int = 0,
                         process_set: Optional[runtime.ProcessSet] = None) -> None:
    """Copy parameters (a ``state_dict()`` or ``named_parameters()``) from ``root_rank`` to every rank,
    in place, one collective per dtype.

    Parameters marked ``_shoal_no_sync`` (a class-sharded classifier's weight, :mod:`shoal.parallel`) are
    skipped, also when given as the detached copies of ``state_dict()``: every rank keeps its own shard.
    Before any data moves, the ranks check in one 16-byte allreduce that they pass the same names, dtypes and
    shapes (sharded parameters: the same names); a difference raises :class:`~shoal.core.errors.MismatchError`
    on every rank, naming every differing tensor (up to 8) and what each rank holds.

    Raises:
        MismatchError: the ranks' tensors differ (name, dtype, shape or device).

    Example:
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    from shoal.core import collectives  # noqa: PLC0415

    ps = runtime.get_process_set(process_set, "broadcast_parameters")
    items = list(params.items()) if hasattr(params, "items") else list(params)
    no_sync = _no_sync_matcher()
    entries, tensors = [], []
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            continue
        if no_sync(t):
            entries.append((str(name), (), "sharded (not broadcast)"))
        else:
            entries.append((str(name), tuple(t.shape), _describe(t)))
            tensors.append(t)
    _check_same_tensors("broadcast_parameters", entries, ps)
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in by_dtype.items():
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            collectives.broadcast_(flat, root_rank, name=f"broadcast_parameters.{dtype}.{device.type}",
                                   process_set=ps)
            off = 0
            for t in ts:
                t.detach().copy_(flat[off:off + t.numel()].view_as(t))
                off += t.numel()


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0,
                              process_set: Optional[runtime.ProcessSet] = None) -> None:
    """Copy the optimizer's state (and hyper-parameters) from ``root_rank`` to every rank.

    The state of parameters marked ``_shoal_no_sync`` (a sharded classifier's momentum, Adam moments and
    step) stays each rank's own and is not sent: a shard's state belongs to that shard (with uneven shards
    it does not even have the same shape). Before the state moves, the ranks check in one 16-byte allreduce that
    their optimizers hold the same parameters (groups, dtypes, shapes).

    Raises:
        MismatchError: the ranks' optimizers hold different parameters.

    Example:
        >>> hvd.broadcast_optimizer_state(opt, root_rank=0)
    """
    from shoal.core import collectives  # noqa: PLC0415

    ps = runtime.get_process_set(process_set, "broadcast_optimizer_state")
    inner = optimizer._inner if isinstance(optimizer, DistributedOptimizer) else optimizer
    named = {}
    if isinstance(optimizer, DistributedOptimizer):
        named = {id(p): n for p, n in zip(optimizer._params, optimizer._names)}
    no_sync = _no_sync_matcher()
    params = [p for g in inner.param_groups for p in g["params"]]
    # state_dict() numbers the parameters 0, 1, ... across the groups in this order.
    local = {i for i, p in enumerate(params) if no_sync(p)}
    entries = []
    i = 0
    for gi, group in enumerate(inner.param_groups):
        for p in group["params"]:
            label = f"{named[id(p)]} (optimizer parameter {i})" if id(p) in named else f"optimizer parameter {i}"
            if i in local:
                entries.append((label, (), f"group {gi}, sharded (state kept)"))
            else:
                entries.append((label, tuple(p.shape), f"group {gi}, {_describe(p)}"))
            i += 1
    _check_same_tensors("broadcast_optimizer_state", entries, ps)
    sent = None
    if runtime.rank() == root_rank:
        sd = inner.state_dict()
        sent = {"state": {k: v for k, v in sd["state"].items() if k not in local},
                "param_groups": sd["param_groups"]}
    received = collectives.broadcast_object(sent, root_rank, name="broadcast_optimizer_state", process_set=ps)
    if runtime.rank() == root_rank:
        return
    kept = {i: inner.state[params[i]] for i in local if params[i] in inner.state}
    inner.load_state_dict(received)
    for i in local:
        inner.state.pop(params[i], None)
        if i in kept:
            inner.state[params[i]] = kept[i]
