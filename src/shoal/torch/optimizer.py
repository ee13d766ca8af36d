"""``DistributedOptimizer``: Horovod's optimizer wrapper, on Shoal's gradient engine.

The wrapper moves gradients in and out of the engine and says when; the step's protocol (counting
firings, the ready order, buckets, negotiation, the NaN check, tuning) belongs to the step owner
(:class:`shoal.core.step.StepOwner`), which every frontend shares.

Design constraints:

1. A horovod.torch user changes only the import: same constructor, ``synchronize()``,
   ``skip_synchronize()``, ``zero_grad()``, the clipping, AMP GradScaler and gradient-accumulation patterns.
   The wrapper is a real ``torch.optim.Optimizer`` (LR schedulers check ``isinstance``) that shares the
   wrapped optimizer's ``param_groups`` and ``state``; no class is built at run time.
2. Zero copies in steady state: each gradient is a view into the engine's bucket buffers. ``zero_grad``
   zeroes the buffers instead of dropping the views when asked to (``set_to_none=False``). If user code
   sets ``.grad = None``, the next gradient is copied into its view once and the view is put back.
3. World size 1 costs nothing: no hooks, ``step`` is the wrapped optimizer's step.
4. Parameters marked no-sync (e.g. a class-sharded classifier, :mod:`shoal.core.no_sync`) are never
   reduced: their gradients are local by design.
5. Gradients are edited after ``synchronize()`` only (Horovod's rule: clip between ``synchronize()`` and
   ``step()`` inside ``skip_synchronize()``); a gradient replaced between ``backward()`` and ``step()``
   fails the step on every rank, naming it (the step owner detects it).
6. The step may overlap the wire (``overlap_step``, opt-in, :mod:`shoal.torch.overlap`).
7. The NaN check does not stop the host (``shoal.core.checks``, constraint 6). When the check ran on the
   device, the verdict stays there: under ``warn`` the step runs as usual; under ``skip``/``raise`` an
   optimizer that takes ``found_inf`` (torch's ``fused=True`` SGD/Adam/AdamW..., the GradScaler hand-over:
   ``optimizer.found_inf``) skips on the device. The host learns at the next step's start (``zero_grad``,
   the first gradient, ``synchronize``) or when ``nan_report``/``skipped_steps`` is read; ``raise`` raises
   there, naming the step. Other optimizers read the verdict in ``step()`` (one host read, as GradScaler's
   ``_maybe_opt_step``), and so does a fused optimizer's first step (the fused SGD kernel, told to skip it,
   would leave momentum buffers it allocated uninitialised: torch/optim/sgd.py ``_fused_sgd``).

What lives elsewhere: the step's protocol (:mod:`shoal.core.step`), the broadcasts
(:mod:`shoal.torch.broadcast_state`), the overlapped step (:mod:`shoal.torch.overlap`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Optional

import torch

from shoal.core import runtime
from shoal.core import timeline as _timeline
from shoal.core.buckets import TensorSpec
from shoal.core.errors import ShoalError
from shoal.core.no_sync import NO_SYNC_ATTR
from shoal.core.ops import ReduceOp, gradient_op, resolve_op
from shoal.core.step import EngineInfo, StepOwner, StepResult, resolve_settings, settle_deferred

from .compression import Compression, engine_compression
from .overlap import OverlapStepper, can_step_in_parts

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that ``step()`` applies gradients averaged across ranks.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        named_parameters: ``model.named_parameters()``; names appear in error messages. Default: the
            optimizer's parameters, named ``param.<group>.<index>``.
        compression: ``Compression.none`` / ``.fp16`` / ``.bf16`` / ``.mixed_fp16`` / ``.mixed_bf16``
            (wire format of buckets; see docs/compression.md).
        backward_passes_per_step: backward passes to accumulate locally before reducing.
        op: ``Average`` (default) or ``Sum``; ``Adasum`` gives Horovod's Adasum optimizer
            (:class:`shoal.torch.adasum.AdasumOptimizer`: each step's parameter deltas are combined by
            Adasum).
        gradient_predivide_factor: divide by this before the sum and by ``size/factor`` after
            (Horovod's meaning; only with Average).
        groups: explicit buckets: a list of lists of parameters, or an int (that many buckets).
        sparse_as_dense: reduce sparse gradients as dense tensors (else: allgather of indices and values).
        process_set: ranks to average over (default: all).
        **engine_options: ``fusion_threshold_mb``, ``first_bucket_mb``, ``num_streams``,
            ``hierarchical``, ``error_feedback``, ``nan_check`` (raise / skip / warn / off, see docs/nan_check.md),
            ``overlap_step`` (step each bucket's parameters as soon as it is reduced; see docs/engine.md):
            override the runtime config for this optimizer.

    Raises:
        TypeError: an unknown keyword. ValueError: a bad value (named). MismatchError: the ranks registered
        different parameters or settings (on every rank).

    Example:
        >>> opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                named_parameters=model.named_parameters())
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __new__(cls, optimizer=None, named_parameters=None, compression=Compression.none,
                backward_passes_per_step: int = 1, op=None, *args, **kwargs):
        if cls is DistributedOptimizer and _is_adasum(op):
            # Horovod's DistributedOptimizer(op=Adasum) is another optimizer (horovod/torch/optimizer.py
            # _DistributedAdasumOptimizer): the deltas of each step are combined, not the gradients.
            from .adasum import AdasumOptimizer  # noqa: PLC0415 (it subclasses this one)

            return super().__new__(AdasumOptimizer)
        return super().__new__(cls)

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters=None,
                 compression=Compression.none, backward_passes_per_step: int = 1, op=None,
                 gradient_predivide_factor: float = 1.0, groups=None, sparse_as_dense: bool = False,
                 process_set: Optional[runtime.ProcessSet] = None, **engine_options):
        # Deliberately not calling Optimizer.__init__: this object is a view of `optimizer`.
        self._inner = optimizer
        # Names first, as Horovod checks them: a bad named_parameters is a ValueError even before init().
        self._params, self._names = self._name_parameters(named_parameters)
        self._init_hooks()
        process_set = runtime.get_process_set(process_set, "DistributedOptimizer")
        if backward_passes_per_step < 1:
            raise ValueError(f"shoal: backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self.backward_passes_per_step = int(backward_passes_per_step)
        op = gradient_op(op)
        if gradient_predivide_factor != 1.0 and op != ReduceOp.Average:
            raise ValueError("shoal: gradient_predivide_factor needs op=Average")
        if "num_groups" in engine_options:  # Horovod's older spelling of groups=<int>
            num_groups = engine_options.pop("num_groups")
            if num_groups:  # 0, Horovod's default, means "not given"
                if groups is not None:
                    raise ValueError("shoal: give groups= or num_groups=, not both (num_groups is Horovod's "
                                     "older name for groups=<int>)")
                groups = num_groups
        #: Step bucket by bucket while later buckets are on the wire (constraint 6); None: the config's.
        self.overlap_step: Optional[bool] = engine_options.pop("overlap_step", None)
        given = {**engine_options, "compression": engine_compression(compression)}
        settings = resolve_settings(given, "DistributedOptimizer")  # now, not when step 1 builds the buckets
        self._skipped = 0
        self._deferred = None  # a verdict on the device, not yet read (7): StepResult.deferred
        self._report = None  # the NaN report of the last synchronization, once known
        self._state_ready = False  # the fused optimizer has state for every parameter (constraint 7)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        #: sparse_as_dense: the parameters whose gradient was sparse this step (handed back sparse).
        self._sparse_as_dense = bool(sparse_as_dense)
        self._was_sparse: set[int] = set()
        self._should_synchronize = True
        self._result: Optional[StepResult] = None  # of the last synchronization
        self._hooks = []
        self._owner = StepOwner(
            [TensorSpec(n, tuple(p.shape), p.dtype, p.device) for n, p in zip(self._names, self._params)],
            settings=settings, process_set=process_set, op=op, prescale=1.0 / gradient_predivide_factor,
            postscale=gradient_predivide_factor, groups=self._resolve_groups(groups),
            backward_passes_per_step=self.backward_passes_per_step, sparse_as_dense=sparse_as_dense,
            fixed={k for k, v in given.items() if v is not None}, what="DistributedOptimizer")
        self._stepper: Optional[OverlapStepper] = None
        #: Whether step() steps bucket by bucket (the user's choice, or the tuner's).
        self._overlap_on = False
        if self._owner.active or runtime.elastic():  # elastic: the world may grow past one rank later
            overlap = self.overlap_step if self.overlap_step is not None else runtime.config().overlap_step
            # Not set by the user and exact for this optimizer: the tuner tries it (shoal.core.autotune).
            tunable = (self.overlap_step is None and can_step_in_parts(self._inner, self._owner.settings.nan_check)
                       and self._owner.offer_overlap(self._switch_overlap))
            self._overlap_on = bool(overlap)
            if overlap or tunable:
                self._stepper = OverlapStepper(self._inner, self._param_of)
                self._owner.add_observer(self._stepper)
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

    @property
    def engine(self) -> EngineInfo:
        """Read-only view of this optimizer's gradient engine: bucket plan, step count, negotiation and
        tuner summaries (:class:`shoal.core.step.EngineInfo`)."""
        return self._owner.info

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters this optimizer reduces, with their names, in registration order."""
        return list(zip(self._names, self._params))

    def register_step_pre_hook(self, hook):
        """Registered on the wrapped optimizer, whose ``step`` runs it (after the gradients are reduced)."""
        return self._inner.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self._inner.register_step_post_hook(hook)

    def state_dict(self):
        return self._inner.state_dict()

    def load_state_dict(self, state_dict):
        self._state_ready = False  # the loaded state may be empty (saved before the first step)
        return self._inner.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        raise ShoalError("shoal: add_param_group on a DistributedOptimizer is not supported yet. HINT: "
                         "add the group to the inner optimizer before wrapping it.")

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._inner!r})"

    def __getstate__(self):
        raise TypeError("shoal: a DistributedOptimizer cannot be pickled; save state_dict() instead")

    # ------------------------------------------------------------------------- set-up helpers
    def _init_hooks(self) -> None:
        """The hook registries torch.optim.Optimizer.__init__ would create (it is not called: this object is
        a view of the wrapped optimizer), so that register_step_pre_hook and friends work."""
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

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
            if not p.requires_grad or getattr(p, NO_SYNC_ATTR, False):
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

    def _param_of(self, j: int) -> tuple[torch.Tensor, bool]:
        """The overlapped step's lookup: the reducer's tensor ``j`` -> (parameter, produced this step)."""
        i = self._owner.index_of(j)
        return self._params[i], self._owner.produced(i)

    # ------------------------------------------------------------------------- hooks
    def _make_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            if not self._should_synchronize and self._owner.synchronized:
                return
            if self._deferred is not None:  # the next step started: read the last verdict (constraint 7)
                self._settle_nan()
            if self._sparse_as_dense and param.grad is not None and param.grad.is_sparse:
                self._was_sparse.add(i)
            view = self._owner.ready(i, param.grad)
            if view is not None:
                # A fresh gradient (after zero_grad(set_to_none=True)) was copied in with the 1/n fused; one
                # that accumulated in place in its view was scaled there (GradientReducer.load).
                param.grad = view
        return hook

    # ------------------------------------------------------------------------- the step
    def synchronize(self) -> None:
        """Wait until every gradient is reduced (launching what is not yet on the wire).

        After this, ``param.grad`` holds the averaged gradient on every rank; call ``step()`` inside
        ``with optimizer.skip_synchronize():`` to avoid a second synchronization (e.g. after clipping:
        edit gradients only between ``synchronize()`` and that ``step()``).
        """
        owner = self._owner
        if not owner.active:
            owner.synchronized = True
            return
        if owner.synchronized:
            return
        self._settle_nan()
        result = owner.synchronize(lambda i: self._params[i].grad, defer_nan=self._can_defer())
        none_have = set(result.none_have)
        for i, p in enumerate(self._params):
            if i in none_have:  # unused on every rank: no gradient, as in single-process training
                p.grad = None
            elif i in result.sparse:
                p.grad = result.sparse[i]
            else:
                view = owner.view(i)
                if view is not None and p.grad is not view:
                    p.grad = view
        # sparse_as_dense reduces a sparse gradient as a dense one; the optimizer gets it back sparse, as
        # the gradient it produced (SparseAdam accepts nothing else).
        for i in self._was_sparse:
            p = self._params[i]
            if p.grad is not None and not p.grad.is_sparse:
                p.grad = p.grad.to_sparse()
        self._was_sparse.clear()
        self._result = result
        self._report = result.nan_report
        self._deferred = result.deferred

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change the number of backward passes accumulated locally per step (Horovod's method); call it
        on every rank, between steps.

        Raises:
            ValueError: ``passes`` < 1. ShoalError: called between ``backward()`` and ``step()``.
        """
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"shoal: set_backward_passes_per_step({passes!r}): passes must be an int >= 1")
        if self._owner.pending and not self._owner.synchronized:
            raise ShoalError("shoal: set_backward_passes_per_step() between backward() and step(). HINT: "
                             "call it between steps, on every rank.")
        self.backward_passes_per_step = passes
        self._owner.passes = passes

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

        With ``overlap_step`` where it is exact (:mod:`shoal.torch.overlap`), the parameters of each bucket
        are stepped as soon as that bucket is reduced, while the later buckets are still on the wire."""
        owner = self._owner
        stepper = None
        if self._should_synchronize:
            if owner.synchronized and owner.active:
                # Horovod's words first: filters written for its warning (``warnings.filterwarnings(
                # "ignore", message="optimizer.step\\(\\) called without ...")``) match from the start.
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize() (shoal: the gradients are already reduced, nothing "
                              "is redone). HINT: step inside `with optimizer.skip_synchronize():` after an "
                              "explicit synchronize().", stacklevel=2)
            else:
                if closure is None and self._stepper is not None and self._overlap_on and owner.built and \
                        can_step_in_parts(self._inner, owner.settings.nan_check):
                    stepper = self._stepper
                    stepper.arm()
                try:
                    self.synchronize()
                except BaseException:
                    if stepper is not None:
                        stepper.disarm()
                    raise
        elif owner.active and not owner.synchronized:
            raise ShoalError("shoal: step() under skip_synchronize() but synchronize() was not called "
                             "this step: gradients would be applied unreduced. HINT: call "
                             "optimizer.synchronize() first.")
        try:
            if owner.active and self._deferred is not None:  # (again, if step() is called twice: guarded)
                return self._step_deferred(self._deferred, closure)
            # NaN/Inf policy (shoal.core.checks): raises, or True on every rank alike for "skip".
            if owner.active and self._result is not None and self._result.apply_nan_policy():
                if stepper is not None:
                    stepper.disarm()
                self._skipped += 1
                return None
            if stepper is not None:  # what no bucket stepped
                stepper.finish()
                return None
            return self._inner_step(closure)
        finally:
            owner.close()

    def _inner_step(self, closure, label: str = "optimizer step"):
        """The wrapped optimizer's step, on the timeline (``closure`` passed only when given)."""
        with _timeline.span("optimizer", label):
            return self._inner.step(closure) if closure is not None else self._inner.step()

    def _switch_overlap(self, on: bool) -> None:
        """The tuner's switch of the overlapped step (between steps, every rank alike)."""
        self._overlap_on = bool(on)

    @property
    def autotune_summary(self) -> Optional[dict]:
        """What the bucket-size / stream-count tuner did (state ``"tuning"`` or ``"settled"``, the choice,
        every trial), the same on every rank; None when the tuner is off or the first step has not run."""
        return self._owner.info.autotune

    @property
    def nan_report(self):
        """The :class:`~shoal.core.checks.NonFiniteReport` of the last synchronization; None when every
        gradient of every rank was finite (or ``nan_check`` is off).

        Where the verdict stayed on the device (constraint 7), reading this reads it: after a tripped step
        that is collective (the findings' ``all_gather``), so read it on every rank, or after the next step
        started; under ``raise`` it raises the step's ``NonFiniteGradientError``."""
        self._settle_nan()
        return self._report

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on every rank by ``nan_check="skip"`` (steps a GradScaler skipped are its own).
        Reading it reads a verdict left on the device (one host read, never a collective)."""
        d = self._deferred
        pending = d is not None and d.stepped and d.policy == "skip" and d.tripped()
        return self._skipped + int(pending)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = int(value)

    # ------------------------------------------------------------------------- the deferred NaN verdict
    def _can_defer(self) -> bool:
        """Whether this step's NaN verdict may stay on the device (constraint 7): ``warn`` never needs it
        before the step; ``skip``/``raise`` need an optimizer that skips on ``found_inf``."""
        policy = self._owner.settings.nan_check
        if policy == "off" or type(self).step is not DistributedOptimizer.step:  # e.g. Adasum: its own step
            return False
        return policy == "warn" or _takes_found_inf(self._inner)

    def _step_deferred(self, verdict, closure):
        """The optimizer step of a step whose verdict is on the device (constraint 7)."""
        inner = self._inner
        if verdict.policy != "warn":
            self._state_ready = self._state_ready or _fused_state_ready(inner)
            if not self._state_ready:
                # Its first step: decide on the host (one read), as the eager path does.
                self._settle_nan(verdict, stepped=True)
                if self._report is not None and self._report.policy == "skip":
                    return None
                return self._inner_step(closure)
            saved = {k: inner.__dict__[k] for k in ("found_inf", "grad_scale") if k in inner.__dict__}
            inner.found_inf, inner.grad_scale = verdict.found_inf, None
            try:
                out = self._inner_step(closure, "optimizer step (skipped on the device on a NaN/Inf)")
            finally:
                for k in ("found_inf", "grad_scale"):
                    inner.__dict__.pop(k, None)
                inner.__dict__.update(saved)
            verdict.stepped = True
            return out
        verdict.stepped = True
        return self._inner_step(closure)

    def _settle_nan(self, verdict=None, stepped: bool = False) -> None:
        """Read the verdict left on the device and apply its policy (constraint 7): at the next step's
        start, at a read of ``nan_report``, or in ``step()`` for an optimizer that cannot skip on the device.
        Collective when the step tripped; every rank gets here at the same point of its collective order
        (before any collective of the next step, or at a read every rank makes)."""
        d = verdict if verdict is not None else self._deferred
        if d is None:
            return
        self._deferred = None
        try:
            self._report, skipped = settle_deferred(d, stepped)  # raises under "raise"
        except ShoalError as err:  # NonFiniteGradientError: its report is the step's report
            self._report = getattr(err, "report", None)
            raise
        self._skipped += int(skipped)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, as ``torch.optim.Optimizer.zero_grad`` does.

        ``set_to_none=True`` (the default) is the cheaper one here too: autograd then hands over fresh
        gradients, which enter their buckets in one fused copy-and-scale pass. With ``False`` the views
        into the buckets are zeroed in place and autograd accumulates into them (a zeroing pass plus an
        add per step: measured slower)."""
        owner = self._owner
        self._settle_nan()  # the next step starts: the last verdict is read here (constraint 7)
        if owner.pending and not owner.synchronized:
            raise ShoalError("shoal: optimizer.zero_grad() was called after loss.backward() but before "
                             "optimizer.step() or optimizer.synchronize(). HINT: zero the gradients "
                             "before backward, or step first.")
        managed = set()
        if not set_to_none and owner.built:
            owner.zero_()
            for i, p in enumerate(self._params):
                view = owner.view(i)
                if view is not None:  # zeroed with its bucket; and the gradient is the view again, in
                    managed.add(id(p))  # case the plan moved since (engine.reconfigure)
                    if p.grad is not None and p.grad is not view:
                        p.grad = view
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in managed or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()
        owner.reset_counts()


def _takes_found_inf(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.step()`` skips on the device when given ``opt.found_inf`` (how GradScaler hands it to
    torch's fused optimizers: torch/amp/grad_scaler.py, ``_step_supports_amp_scaling``)."""
    return bool(getattr(opt, "_step_supports_amp_scaling", False)) and bool(opt.defaults.get("fused"))


def _fused_state_ready(opt: torch.optim.Optimizer) -> bool:
    """Whether every parameter with a gradient has its optimizer state: a fused kernel told to skip its
    first step would leave the state it allocated there (SGD's momentum: ``torch.empty_like``) unset."""
    return all(p in opt.state and opt.state[p] for g in opt.param_groups for p in g["params"]
               if p.grad is not None) or not _needs_state(opt)


def _needs_state(opt: torch.optim.Optimizer) -> bool:
    """SGD without momentum keeps no state; every other fused optimizer does."""
    return not (isinstance(opt, torch.optim.SGD) and all(g.get("momentum", 0) == 0 for g in opt.param_groups))


def _is_adasum(op) -> bool:
    """Whether ``op`` means Adasum (anything else, valid or not, is the gradient engine's to check)."""
    if isinstance(op, str):
        return op.lower() == "adasum"
    try:
        return resolve_op(op, None, "DistributedOptimizer") is ReduceOp.Adasum
    except (TypeError, ValueError):
        return False
