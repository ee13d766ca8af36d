"""``DistributedOptimizer`` for Keras 3: gradients averaged across ranks on the TensorFlow, JAX and PyTorch
backends, by the same engine as ``shoal.torch`` (the step owner, :class:`shoal.core.step.StepOwner`: buckets,
per-step negotiation, the stall inspector, join, the NaN check and the tuner, as on torch).

Design constraints:

1. One path into the engine. Every backend ends in the step owner's ``ready`` / ``synchronize`` / ``view``;
   what differs is only how gradients reach it (:mod:`shoal.keras._bridge`): TF and JAX hand them over in
   one host call per step (``tf.py_function`` / ``io_callback(ordered=True)``), torch marks them ready from
   autograd hooks while backward runs (the engine's overlap), as ``shoal.torch`` does. One step owner per
   set of trainable variables; when that set changes (layers frozen or unfrozen between epochs), the
   torch hooks are removed and registered again for the new set (:meth:`_Exchange._disarm`). Within a
   set, a variable without a gradient on this rank is simply not produced here: the per-step
   negotiation then gives it the other ranks' average (zeros from this rank), so ranks never diverge
   (TF and JAX apply that average; on torch, a variable no rank produced keeps no gradient, as in torch).
2. Patch the user's optimizer instance; build no class. ``DistributedOptimizer(opt)`` replaces two bound
   methods of ``opt`` (``apply`` and ``stateless_apply``) and returns ``opt``. Why not a wrapper class:
   Keras' optimizer surface is large and backend-specific (variables, iterations, learning rate, build,
   save/load of its variables, ``get_config``, tf.distribute hooks); Keras' own wrapper,
   ``LossScaleOptimizer``, needs ~300 lines with backend branches for it, and any member a wrapper forgets
   to forward would silently bypass the averaging. Patching keeps the user's class (``isinstance`` checks,
   ``get_config``, checkpoints: a saved model reloads with a plain optimizer) and cannot miss a path,
   because every update goes through one of the two methods (constraint 3). Horovod built a subclass at
   run time with ``type(...)``; that class cannot be deserialised by name.
3. Hook ``apply`` AND ``stateless_apply``. The TF and torch trainers call ``apply_gradients`` -> ``apply``;
   the JAX trainer calls ``stateless_apply``. The base ``stateless_apply`` calls ``self.apply`` inside a
   ``StatelessScope`` (reduced once: a guard skips the inner call), but ``LossScaleOptimizer`` overrides it
   and calls its inner optimizer's ``stateless_apply``, never its own ``apply``: hooking ``apply`` alone,
   JAX + loss scaling trains every rank on its own gradients without any error.
4. Reduce before anything reads the gradients: the loss-scale optimizer's finite check, clipping, Keras'
   accumulation. Every rank then sees the same values and takes the same branch (apply or skip, loss
   scale up or down). Hence wrap the ``LossScaleOptimizer``, not its inner optimizer;
   ``compile(auto_scale_loss=True)`` under ``mixed_float16`` wraps ours the wrong way round, which the
   first apply detects (:meth:`_Exchange.check_caller`) and the callbacks of :mod:`shoal.keras.callbacks`
   already at the start of ``fit``.
5. Gradient accumulation (Keras' ``gradient_accumulation_steps``; ``backward_passes_per_step`` sets it):
   ``apply`` runs on every micro-batch. Reduce once per real step: on the update micro-step only, reduce
   ``g + s * acc`` (the rank's whole window; ``s`` the optimizer's fixed ``loss_scale_factor``, 1 without),
   then zero the accumulator, so that Keras' own ``(g + acc) / k`` becomes ``(reduced + 0) / k``, exactly.
   Exception, measured by reasoning rather than luck: under a ``LossScaleOptimizer`` the skip decision is
   taken on every micro-batch and moves the inner optimizer's micro-step counter; ranks that disagreed
   once would disagree on which micro-step is the update step from then on. So with a loss-scale
   optimizer every micro-batch is reduced (the accumulation then runs on averaged micro-gradients).
6. The engine's NaN/Inf check (``nan_check``: raise / warn / skip / off, :mod:`shoal.core.checks`) runs on
   the local gradients before they travel. Under a ``LossScaleOptimizer`` it defaults to ``off``:
   non-finite gradients are how loss scaling finds its scale, and the optimizer skips those steps itself,
   on every rank alike (constraint 4). ``skip`` skips the update on every rank (with accumulation it also
   counts the micro-step, so that the update steps stay aligned).
7. World size 1 costs nothing: the patched methods call the originals.
8. Ranks that disagree fail with a named error, never a hang. A rank whose ``nan_check`` differs (the env
   var set on some ranks only; a LossScaleOptimizer on one rank, which turns it off there, constraint 6)
   never starts the flag allreduce its peers wait in; other compression, bucket sizes or stream counts
   pair different buckets, or create a different number of stream groups (collective over the world).
   So before a step owner is built, its variables (shape, dtype) and those settings go through
   the step owner's registration check (:mod:`shoal.core.registration`): one 16-byte allreduce per
   step owner, not per step.
   Variables are compared by position in the optimizer, not by path: Keras numbers layer names per
   process (measured: one extra ``Dense`` built first on a rank turns its ``dense_1/kernel`` into
   ``dense_2/kernel``), so paths may differ on ranks that train the same model.

Glossary:
    exchange      this module's per-optimizer state: the step owners (one per set of trainable variables that get
                  gradients, normally one), the torch hooks, counters
    update step   the micro-step on which Keras applies the accumulated gradients
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, Optional, Sequence

import torch

from shoal.core import runtime
from shoal.core.buckets import TensorSpec
from shoal.core.compression import Compression, resolve_compression
from shoal.core.errors import HorovodInternalError, MismatchError, ShoalError
from shoal.core.ops import ReduceOp, gradient_op
from shoal.core.step import StepOwner, resolve_settings

from . import _bridge

__all__ = ["DistributedOptimizer", "is_distributed", "exchange_stats"]

log = logging.getLogger(__name__)

_ATTR = "_shoal_exchange"


def DistributedOptimizer(optimizer, compression=Compression.none, backward_passes_per_step: int = 1,
                         op=None, gradient_predivide_factor: float = 1.0,
                         process_set: Optional[runtime.ProcessSet] = None, nan_check: Optional[str] = None,
                         name: Optional[str] = None, **engine_options):
    """Make ``optimizer`` average its gradients across ranks before applying them; returns ``optimizer``.

    Args:
        optimizer: a Keras 3 optimizer, or a ``keras.optimizers.LossScaleOptimizer`` (wrap that, not its
            inner optimizer: see docs/keras.md).
        compression: ``Compression.none`` / ``.fp16`` / ``.bf16`` / ``.mixed_fp16`` / ``.mixed_bf16``.
        backward_passes_per_step: micro-batches per update; sets Keras' ``gradient_accumulation_steps``
            (on the inner optimizer of a loss-scale optimizer). Gradients are averaged over the
            micro-batches, as Keras does, and reduced once per update.
        op: ``Average`` (default) or ``Sum``.
        gradient_predivide_factor: divide by this before the sum and by ``size / factor`` after.
        process_set: ranks to average over (default: all).
        nan_check: ``raise`` / ``warn`` / ``skip`` / ``off``; default the runtime config, or ``off``
            for a loss-scale optimizer.
        name: accepted for Horovod compatibility; unused.
        **engine_options: ``fusion_threshold_mb``, ``first_bucket_mb``, ``num_streams``,
            ``hierarchical``, ``error_feedback``: override the runtime config for this optimizer.

    Returns:
        ``optimizer`` itself, with ``apply`` and ``stateless_apply`` patched.

    Raises:
        ValueError: the optimizer is already distributed, or ``backward_passes_per_step`` conflicts with
            an already built optimizer.

    Example:
        >>> import shoal.keras as hvd
        >>> hvd.init()
        >>> opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.01 * hvd.size()))
        >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        >>> model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    """
    keras = _bridge.import_keras()
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"shoal: DistributedOptimizer needs a keras.optimizers.Optimizer, got "
                        f"{type(optimizer).__name__}. HINT: for torch.optim optimizers use shoal.torch.")
    if getattr(optimizer, _ATTR, None) is not None:
        raise ValueError(f"shoal: optimizer {optimizer.name!r} is already a DistributedOptimizer. HINT: wrap "
                         "it once; DistributedOptimizer returns the same object.")
    lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if backward_passes_per_step < 1:
        raise ValueError(f"shoal: backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    if backward_passes_per_step > 1:
        _set_accumulation(optimizer.inner_optimizer if lso else optimizer, int(backward_passes_per_step))
    op_name = gradient_op(op)
    if gradient_predivide_factor != 1.0 and op_name != ReduceOp.Average:
        raise ValueError("shoal: gradient_predivide_factor needs op=Average")
    ex = _Exchange(optimizer, backend=keras.backend.backend(), lso=lso, op=op_name,
                   prescale=1.0 / gradient_predivide_factor, postscale=gradient_predivide_factor,
                   compression=resolve_compression(compression), process_set=process_set,
                   nan_check=nan_check, engine_options=engine_options)
    object.__setattr__(optimizer, _ATTR, ex)
    # Constraint 2: bound methods on the instance shadow the class's; object.__setattr__ keeps them out of
    # Keras' and TF's attribute tracking (they are not state to save).
    object.__setattr__(optimizer, "apply", types.MethodType(_patched_apply, optimizer))
    if ex.backend != "tensorflow":  # TF's optimizer refuses stateless_apply (tf.distribute); leave it so
        object.__setattr__(optimizer, "stateless_apply", types.MethodType(_patched_stateless_apply, optimizer))
    return optimizer


def is_distributed(optimizer) -> bool:
    """True when ``optimizer`` went through :func:`DistributedOptimizer`."""
    return getattr(optimizer, _ATTR, None) is not None


def exchange_stats(optimizer) -> dict[str, int]:
    """Counters of a distributed optimizer.

    Returns:
        ``reductions``: steps whose gradients were reduced; ``skipped_steps``: updates skipped on every
        rank by ``nan_check="skip"`` (``shoal.torch``'s ``optimizer.skipped_steps``; steps a
        LossScaleOptimizer skips are its own); ``hooked``: torch backend, gradients marked ready from
        backward hooks (put on the wire during backward); ``reducers``: engine reducers built, one per
        set of variables that got gradients (a second one after layers were frozen or unfrozen).

    Raises:
        ValueError: ``optimizer`` did not go through :func:`DistributedOptimizer`.

    Example:
        >>> hvd.exchange_stats(model.optimizer)["skipped_steps"]
        0
    """
    ex = getattr(optimizer, _ATTR, None)
    if ex is None:
        raise ValueError("shoal: exchange_stats() needs an optimizer wrapped by DistributedOptimizer. "
                         "HINT: pass the optimizer that hvd.DistributedOptimizer(...) returned.")
    return {"reductions": ex.reductions, "skipped_steps": ex.skipped_steps, "hooked": ex.hooked,
            "reducers": len(ex.owners)}


def _set_accumulation(opt, steps: int) -> None:
    current = opt.gradient_accumulation_steps
    if current == steps:
        return
    if current or opt.built:
        raise ValueError(
            f"shoal: backward_passes_per_step={steps} but optimizer {opt.name!r} "
            + (f"has gradient_accumulation_steps={current}" if current else "is already built without "
               "gradient accumulation")
            + ". HINT: pass gradient_accumulation_steps to the optimizer's constructor, or wrap it before "
              "model.compile()/fit() builds it.")
    opt.gradient_accumulation_steps = steps


# ------------------------------------------------------------------------------------------- state access

class _Stateful:
    """Reads and writes optimizer variables in place (TF, torch, eager JAX)."""

    @staticmethod
    def read(var):
        return var.value

    @staticmethod
    def write(var, value) -> None:
        var.assign(value)


class _Stateless:
    """Reads and writes the explicit state of ``stateless_apply`` (JAX): ``values`` follows
    ``optimizer.variables``."""

    def __init__(self, optimizer, values: Sequence[Any]):
        self.values = list(values)
        self._index = {id(v): i for i, v in enumerate(optimizer.variables)}

    def read(self, var):
        return self.values[self._index[id(var)]]

    def write(self, var, value) -> None:
        self.values[self._index[id(var)]] = value


# ------------------------------------------------------------------------------------------- the patches

def _patched_apply(self, grads, trainable_variables=None):
    ex: _Exchange = getattr(self, _ATTR)
    if ex.bypass:
        return ex.original_apply(grads, trainable_variables)
    ex.check_caller()
    if not ex.active:
        return ex.original_apply(grads, trainable_variables)
    if not self.built and trainable_variables is not None:
        # Built here rather than in the original apply: the accumulators must exist before we read them.
        keras = _bridge.import_keras()
        with keras.name_scope(self.name, caller=self):
            self.build(list(trainable_variables))
        self.built = True
    tvars = list(trainable_variables) if trainable_variables is not None else list(self._trainable_variables)
    new_grads, skip = ex.reduce(list(grads), tvars, _Stateful())
    if skip is None:
        return ex.original_apply(new_grads, trainable_variables)
    ops = _bridge.import_keras().ops

    def skipped():
        if ex.accumulation:
            self._iterations.assign_add(1)  # constraint 6: keep the update steps aligned

    return ops.cond(ops.greater(skip, 0), skipped,
                    lambda: ex.original_apply(new_grads, trainable_variables))


def _patched_stateless_apply(self, optimizer_variables, grads, trainable_variables):
    ex: _Exchange = getattr(self, _ATTR)
    ex.check_caller()
    if not ex.active:
        return ex.original_stateless_apply(optimizer_variables, grads, trainable_variables)
    state = _Stateless(self, optimizer_variables)
    new_grads, skip = ex.reduce(list(grads), list(self._trainable_variables), state)
    ex.bypass += 1  # the base stateless_apply calls self.apply: reduced already (constraint 3)
    try:
        if skip is None:
            return ex.original_stateless_apply(state.values, new_grads, trainable_variables)
        ops = _bridge.import_keras().ops

        def skipped():
            values = list(state.values)
            if ex.accumulation:
                i = state._index[id(self._iterations)]
                values[i] = values[i] + 1
            return list(trainable_variables), values

        return ops.cond(ops.greater(skip, 0), skipped,
                        lambda: ex.original_stateless_apply(state.values, new_grads, trainable_variables))
    finally:
        ex.bypass -= 1


# ------------------------------------------------------------------------------------------- the exchange

class _Exchange:
    """Per-optimizer state between Keras and the engine (see the glossary)."""

    def __init__(self, optimizer, *, backend: str, lso: bool, op: str, prescale: float, postscale: float,
                 compression: Optional[str], process_set, nan_check: Optional[str], engine_options: dict):
        self.opt = optimizer
        self.backend = backend
        self.lso = lso
        self.original_apply = optimizer.apply
        self.original_stateless_apply = optimizer.stateless_apply
        self._process_set_arg = process_set
        self.process_set = runtime.get_process_set(process_set)
        self.op, self.prescale, self.postscale = op, prescale, postscale
        given = {**engine_options, "compression": compression,
                 "nan_check": nan_check or ("off" if lso else None)}
        #: The resolved settings (shoal.core.step.resolve_settings), checked now, not at the first step.
        self.settings = resolve_settings(given, "DistributedOptimizer")
        self.fixed = frozenset(k for k, v in given.items() if v is not None)
        self.nan_policy = self.settings.nan_check
        #: Constraint 5: Keras' accumulation steps on this optimizer (None: none, or a loss-scale one).
        self.accumulation: Optional[int] = None if lso else (optimizer.gradient_accumulation_steps or None)
        self.bypass = 0
        #: One step owner per set of trainable variables (constraint 1).
        self.owners: dict[tuple[int, ...], StepOwner] = {}
        self._none_have: set[int] = set()
        self.reductions = 0
        self.skipped_steps = 0
        self.hooked = 0
        self._caller_checked = False
        # torch backend (constraint 1): hooks feed the reducer of `_armed`; `_marked` this step's slots.
        self._armed: Optional[tuple[int, ...]] = None
        self._hooks: list = []
        self._marked: set[int] = set()
        self._hook_accs: list = []
        self._hook_scale = 1.0
        self._next_is_update = True
        #: (key, world) -> update steps reduced in that world (the re-plan happens at the same step everywhere)
        self._world_steps: dict[tuple[Any, int], int] = {}
        if backend == "torch":
            # jit_compile=True (torch.compile): dynamo must not trace collectives and Python bookkeeping;
            # it breaks the graph here and runs this eagerly (it failed inside broadcast_object_list).
            self._reduce_torch = torch.compiler.disable(self._reduce_torch)

    @property
    def active(self) -> bool:
        """Whether this rank reduces anything in the current world (elastic training may change it)."""
        ps = runtime.get_process_set(self._process_set_arg)
        return ps.included() and (ps.size() > 1 or self.op == ReduceOp.Sum or self.prescale * self.postscale != 1.0)

    # ------------------------------------------------------------------ the caller
    def check_caller(self) -> None:
        """Constraint 4, at the first apply on every backend: raise when a LossScaleOptimizer that is not
        itself distributed wraps this optimizer (``compile(auto_scale_loss=True)`` under a
        ``mixed_float16`` policy does so). Its finite check would run on each rank's local gradients,
        before the reduction: a rank whose gradients overflow skips the inner apply, and with it the
        collective its peers are waiting in. Checked until it passes once (TF and JAX: at trace time,
        where both branches of the loss-scale optimizer's ``cond`` are traced, so every rank raises)."""
        if self._caller_checked:
            return
        outer = _outer_loss_scaler(self.opt)
        if outer is not None:
            raise ShoalError(
                f"shoal: optimizer {self.opt.name!r} is a DistributedOptimizer inside a LossScaleOptimizer "
                f"({outer.name!r}) on rank {runtime.rank()}: its finite check sees each rank's own "
                "gradients before they are averaged, so ranks can disagree on skipping a step, and the "
                "rank that skips leaves its peers waiting in the allreduce. HINT: wrap the other way round, "
                "hvd.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt)), and pass that to "
                "compile() (compile() then adds no second one under mixed_float16), or compile(..., "
                "auto_scale_loss=False).")
        self._caller_checked = True

    # ------------------------------------------------------------------ selection and accumulation
    def reduce(self, grads: list, tvars: list, state) -> tuple[list, Any]:
        """Reduce the gradients of one micro-step; returns the gradients to apply and the skip flag
        (a backend int scalar, or None when the policy is not ``skip``).

        One step owner per set of trainable variables (constraint 1). A variable with no gradient on this
        rank is not produced here: it gets the other ranks' average (zeros from this rank), so ranks never
        diverge; on the torch backend, a variable no rank produced keeps no gradient, as in torch."""
        opt = self.opt
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return grads, None
        key = tuple(opt._get_variable_index(v) for v in tvars)
        g_sel = [self._dense(grads[i]) for i in present]
        if self.backend == "torch":
            out, skip = self._reduce_torch(key, present, g_sel, tvars)
        elif self.accumulation is None:
            out, skip = self._exchange(key, present, g_sel, tvars)
        else:
            out, skip = self._reduce_on_update(key, present, g_sel, tvars, state)
        return list(out), (skip if self.nan_policy == "skip" else None)

    def _accumulators(self, variables: list) -> tuple[list, float]:
        opt = self.opt
        accs = [opt._accumulated_gradients[opt._get_variable_index(v)] for v in variables]
        return accs, float(opt.loss_scale_factor or 1.0)

    def _reduce_on_update(self, key, present: list[int], g_sel: list, variables: list, state) -> tuple[list, Any]:
        """Constraint 5 for TF and JAX: a backend ``cond`` on the update step around the host call."""
        ops = _bridge.import_keras().ops
        accs, scale = self._accumulators([variables[i] for i in present])
        acc_vals = [state.read(a) for a in accs]
        is_update = ops.equal(ops.mod(state.read(self.opt._iterations) + 1, self.accumulation), 0)
        shapes = [self._var_spec(v) for v in variables]

        def update():
            totals = [g + (a if scale == 1.0 else a * scale) for g, a in zip(g_sel, acc_vals)]
            out, skip = self._exchange(key, present, totals, variables)
            return out, [ops.zeros_like(a) for a in acc_vals], skip

        def keep():
            full = [ops.zeros(s, dtype=d) for s, d in shapes]
            for i, g in zip(present, g_sel):
                full[i] = g
            return full, list(acc_vals), ops.convert_to_tensor(0, dtype="int32")

        out, new_accs, skip = ops.cond(is_update, update, keep)
        for a, v in zip(accs, new_accs):
            state.write(a, v)
        return list(out), skip

    def _dense(self, g):
        if self.backend == "tensorflow":
            import tensorflow as tf  # noqa: PLC0415

            if isinstance(g, tf.IndexedSlices):  # embedding gradients: reduced dense (sparse_as_dense)
                return tf.convert_to_tensor(g)
        return g

    @staticmethod
    def _var_spec(v) -> tuple[tuple[int, ...], str]:
        keras = _bridge.import_keras()
        return tuple(int(d) for d in v.shape), keras.backend.standardize_dtype(v.dtype)

    # ------------------------------------------------------------------ host side (all backends)
    def _exchange(self, key, present: list[int], tensors: list, variables: list) -> tuple[list, Any]:
        """One host call for the whole step (bridge constraint 3): the present gradients in, every
        variable's reduced gradient and the skip flag out."""
        specs = [self._var_spec(v) for v in variables] + [((), "int32")]
        traced = _bridge.in_tf_trace(self.backend)
        outs = _bridge.run_on_host(lambda ts: self._host_reduce(key, present, variables, ts, traced), tensors,
                                   specs, self.backend, what="gradient allreduce")
        return outs[:-1], outs[-1]

    def _owner(self, key, variables: list) -> StepOwner:
        owner = self.owners.get(key)
        if owner is None:
            names = _unique_names(variables)
            device = runtime.device()
            specs = []
            for n, v in zip(names, variables):
                shape, dtype = self._var_spec(v)
                specs.append(TensorSpec(n, shape, getattr(torch, dtype), device))
            try:
                owner = StepOwner(
                    specs, settings=self.settings, process_set=self.process_set, op=self.op,
                    prescale=self.prescale, postscale=self.postscale, fixed=self.fixed,
                    what="shoal.keras DistributedOptimizer",
                    extra_settings={"micro_batches_per_reduction": self.accumulation or 1},
                    registered_as=[f"variable {i} ({getattr(v, 'name', 'variable')})"
                                   for i, v in zip(key, variables)])
            except MismatchError as exc:
                here = "; ".join(f"variable {i}: '{n}'" for i, n in list(zip(key, names))[:4])
                raise MismatchError(
                    f"{exc} Keras: a LossScaleOptimizer turns nan_check off unless nan_check= is given "
                    "(docs/keras.md), so wrapping one on some ranks only shows as a nan_check difference; "
                    "backward_passes_per_step sets micro_batches_per_reduction. Variables are compared by "
                    f"position in the optimizer; on rank {runtime.rank()}: {here}"
                    + (" ..." if len(key) > 4 else "") + ".", culprit_ranks=exc.culprit_ranks) from None
            self.owners[key] = owner
        return owner

    def _host_reduce(self, key, present: list[int], variables: list, tensors: list[torch.Tensor],
                     traced: bool = False) -> list[torch.Tensor]:
        owner = self._owner(key, variables)
        given = dict(zip(present, tensors))
        with torch.no_grad():
            # Reverse registration order: roughly backward order, the engine's default bucket plan.
            for j in reversed(present):
                owner.ready(j, given[j].reshape(owner.specs[j].shape))
            try:
                return self._finish(owner, given)
            except HorovodInternalError:
                if traced:
                    # A peer lost during a traced TensorFlow step leaves it half done: the ops that do not
                    # wait for the host call ran, Keras' iterations.assign_add(1) among them (measured: 21
                    # iterations after 20 steps kept across a SIGKILLed peer, tests/launcher/
                    # test_keras_elastic.py), so the survivors go back to the last commit, as for
                    # shoal.tensorflow's tape (its constraint 9).
                    from shoal.core import elastic as _elastic  # noqa: PLC0415 (elastic only)

                    _elastic.note_partial_update()
                raise

    def _finish(self, owner: StepOwner, given: dict) -> list[torch.Tensor]:
        """Synchronize ``owner`` (``given``: this step's gradients by index, read in step 1 only: later
        ones are in their views already) and return every variable's gradient and the skip flag."""
        built = owner.built
        result = owner.synchronize(lambda j: None if built else
                                   (given[j].reshape(owner.specs[j].shape) if j in given else None))
        owner.close()
        self.reductions += 1
        skip = result.apply_nan_policy()  # the same report, hence the same verdict, on every rank
        self.skipped_steps += int(skip)
        self._none_have = set(result.none_have)
        return [owner.view(j) for j in range(len(owner.specs))] + [torch.tensor(int(skip), dtype=torch.int32)]

    # ------------------------------------------------------------------ torch backend: hooks
    def _reduce_torch(self, key, present: list[int], g_sel: list, variables: list) -> tuple[list, Any]:
        """Eager torch: the update-step decision is a Python bool; from the second step on the hooks
        have already copied (and marked ready) what backward produced."""
        it = int(self.opt._iterations.value) if self.accumulation else 0
        is_update = self.accumulation is None or (it + 1) % self.accumulation == 0
        if self.accumulation:
            # What the hooks of the next micro-step must do (apply increments iterations by one).
            self._next_is_update = (it + 2) % self.accumulation == 0
        if self._armed and self._armed != key:
            self._disarm()
        if not is_update:
            full: list = [None] * len(variables)
            for i, g in zip(present, g_sel):
                full[i] = g
            return full, torch.tensor(0, dtype=torch.int32)
        accs, scale = self._accumulators(variables) if self.accumulation else ([], 1.0)
        with torch.no_grad():
            owner = self._owner(key, variables)
            hooked = self._armed == key
            given = {}
            for i, g in zip(present, g_sel):
                value = g.reshape(owner.specs[i].shape)
                if accs:
                    value = value + accs[i].value.reshape(value.shape) * scale
                given[i] = value
            for j in sorted(given, reverse=True):
                if hooked and j in self._marked:
                    continue
                owner.ready(j, given[j])
            self._marked = set()
            outs = self._finish(owner, given)
            # Plan the buckets in the order gradients really arrived, after the second update step of each
            # world: every rank's hooks were armed by then (a worker that joined an elastic job arms them
            # after its first step, when the others already had), so every rank re-plans at the same step.
            marker = (key, runtime.generation())
            self._world_steps[marker] = done = self._world_steps.get(marker, 0) + 1
            if done == 2 and hooked:
                owner.replan_to_last_order()
            for a in accs:
                a.value.zero_()
        if self._armed is None:
            self._arm(key, variables, accs, scale)
        grads = [None if j in self._none_have else o for j, o in enumerate(outs[:-1])]
        return grads, outs[-1]

    def _arm(self, key, variables: list, accs: list, scale: float) -> None:
        """Register post-accumulate-grad hooks, so later steps put gradients on the wire during backward."""
        params = [v.value for v in variables]
        if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
            self._armed = ()  # not plain torch parameters: keep reducing at apply time
            return
        self._armed = key
        self._hook_accs = accs
        self._hook_scale = scale
        for j, p in enumerate(params):
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(key, j)))

    def _disarm(self) -> None:
        """The set of variables that get gradients changed (layers frozen or unfrozen, e.g. fine-tuning
        after some epochs): the hooks of the old set must go, or they keep marking the old step owner,
        which then fails the next step with "became ready twice" (or, with hooks on a frozen layer, never
        completes a bucket). In this step's backward the old hooks have already marked, and maybe put on
        the wire, the gradients still in the set: every rank did the same (the set is the same on every
        rank), so finishing the old owner's step here completes those collectives in the same order
        everywhere and leaves it clean for a later return to that set. Its result is discarded: the new
        set's owner reduces this step from the gradients themselves, and the new hooks are armed after it."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        old = self.owners.get(self._armed)
        if self._marked and old is not None:
            old.synchronize(lambda j: None)
            old.close()
            self.hooked -= len(self._marked)  # counted as overlapped, but their result is discarded
        self._marked = set()
        self._armed = None

    def _make_hook(self, key, j: int):
        def hook(param: torch.Tensor) -> None:
            if self._armed != key or not self._next_is_update or param.grad is None:
                return
            owner = self.owners[key]
            with torch.no_grad():
                value = param.grad
                if self._hook_accs:
                    value = value + self._hook_accs[j].value.reshape(value.shape) * self._hook_scale
                owner.ready(j, value.reshape(owner.specs[j].shape))
            self._marked.add(j)
            self.hooked += 1
        return hook


#: How far up the stack check_caller looks for a LossScaleOptimizer method. Measured with Keras 3.15 on
#: all three backends: the direct caller of our patched method is the loss-scale optimizer's
#: ``_stateful_handle_finite_grads`` / ``_stateless_handle_finite_grads``; 16 frames leave room for a
#: subclass or another Keras version that adds a level or two.
_MAX_CALLER_FRAMES = 16


def _outer_loss_scaler(opt):
    """The LossScaleOptimizer, not itself distributed, whose method called ``opt``'s patched method, or None.

    Why the stack: the inner optimizer holds no reference to whoever wraps it, and the wrapping can come
    after DistributedOptimizer (``compile(auto_scale_loss=True)``). Looked at until the first apply passes.
    """
    lso_type = _bridge.import_keras().optimizers.LossScaleOptimizer
    frame = sys._getframe(3)  # 0: here, 1: check_caller, 2: the patched method, 3: whoever called it
    for _ in range(_MAX_CALLER_FRAMES):
        if frame is None:
            return None
        code = frame.f_code
        if "self" in code.co_varnames or "self" in code.co_freevars:
            caller = frame.f_locals.get("self")
            if isinstance(caller, lso_type) and caller.inner_optimizer is opt and not is_distributed(caller):
                return caller
        frame = frame.f_back
    return None


def _unique_names(variables: list) -> list[str]:
    names, seen = [], {}
    for v in variables:
        base = getattr(v, "path", None) or getattr(v, "name", None) or "variable"
        n = seen.get(base, 0)
        seen[base] = n + 1
        names.append(base if n == 0 else f"{base}#{n}")
    return names
