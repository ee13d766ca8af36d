"""Horovod's Keras callbacks: ``BroadcastGlobalVariablesCallback``, ``MetricAverageCallback``,
``LearningRateWarmupCallback``.

Every callback here also prepares the model once per ``fit``, at ``on_train_begin`` (after Keras has
built the optimizer and created the train function, before its first trace), which is the one moment
Keras lets anyone change how the train step is compiled:

1. TensorFlow with ``jit_compile=True`` (Keras' ``"auto"`` picks it whenever a GPU is visible): XLA cannot
   compile the host call that reduces gradients. The train function is rebuilt without XLA (a warning
   says so); ``evaluate`` and ``predict`` keep XLA. Without any of these callbacks the trace raises a
   ShoalError with a HINT instead (:mod:`shoal.keras._bridge`).
2. ``compile(auto_scale_loss=True)`` under a ``mixed_float16`` policy puts Keras' LossScaleOptimizer
   around an already distributed optimizer: its finite check would then run on local gradients, and
   ranks could disagree on skipping a step. Raised as an error, with the fix (here, before the first
   step; without any of these callbacks the first ``apply`` raises the same, see
   :meth:`shoal.keras.optimizer._Exchange.check_caller`).

What lives elsewhere: the collectives (:mod:`shoal.keras.collectives`), gradient averaging
(:mod:`shoal.keras.optimizer`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from shoal.core import collectives as _coll
from shoal.core import runtime
from shoal.core.errors import ShoalError

from . import _bridge
from .collectives import broadcast_variables
from .optimizer import is_distributed

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateWarmupCallback",
           "prepare_model"]

log = logging.getLogger(__name__)

_keras = _bridge.import_keras()

#: model -> the train function built without XLA by prepare_model (so that a second fit does not rebuild it).
_rebuilt: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prepare_model(model) -> None:
    """Make ``model``'s train step able to run Shoal's host call (see the module docstring); idempotent.

    Raises:
        ShoalError: a LossScaleOptimizer wraps a distributed optimizer (compile's ``auto_scale_loss``).
    """
    opt = getattr(model, "optimizer", None)
    if opt is None:
        return
    if isinstance(opt, _keras.optimizers.LossScaleOptimizer) and is_distributed(opt.inner_optimizer) \
            and not is_distributed(opt):
        raise ShoalError(
            "shoal: model.optimizer is a LossScaleOptimizer around a DistributedOptimizer (compile() adds one "
            "under a mixed_float16 policy): its finite check would see each rank's own gradients, and ranks "
            "could disagree on skipping a step. HINT: wrap the loss-scale optimizer instead, "
            "DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt)), or compile(..., "
            "auto_scale_loss=False).")
    if not is_distributed(opt) or _keras.backend.backend() != "tensorflow":
        return
    if not getattr(model, "jit_compile", False) or getattr(model, "run_eagerly", False):
        return
    if model.train_function is not None and _rebuilt.get(model) is model.train_function:
        return
    model.jit_compile = False
    try:
        model.make_train_function(force=True)
    finally:
        model.jit_compile = True
    _rebuilt[model] = model.train_function
    if runtime.rank() == 0:
        log.warning("shoal: the train step runs without XLA (jit_compile=True cannot compile the host call "
                    "that averages gradients); evaluate() and predict() keep XLA.")


class _Prepares(_keras.callbacks.Callback):
    """Base of this module's callbacks: :func:`prepare_model` at the start of ``fit``."""

    def on_train_begin(self, logs=None):
        prepare_model(self.model)


class BroadcastGlobalVariablesCallback(_Prepares):
    """At the start of ``fit``, copy every model and optimizer variable from ``root_rank`` to all ranks,
    so that every rank starts from the same weights.

    Args:
        root_rank: the rank whose values win.
        device: accepted for Horovod compatibility; unused.

    Example:
        >>> model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    """

    def __init__(self, root_rank: int = 0, device: str = "", process_set: Optional[runtime.ProcessSet] = None):
        super().__init__()
        self.root_rank = int(root_rank)
        self.process_set = process_set
        self.broadcast_done = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.broadcast_done:
            return
        model = self.model
        variables = list(model.weights)
        if model.optimizer is not None and model.optimizer.built:
            variables += list(model.optimizer.variables)
        broadcast_variables(variables, self.root_rank, process_set=self.process_set)
        self.broadcast_done = True


class MetricAverageCallback(_Prepares):
    """At the end of every epoch, replace each numeric entry of ``logs`` by its average over ranks.

    Put it before the callbacks that read the logs (checkpointing, early stopping, CSV logging).

    Example:
        >>> callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()]
    """

    def __init__(self, process_set: Optional[runtime.ProcessSet] = None):
        super().__init__()
        self.process_set = process_set

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) or
                      (hasattr(v, "shape") and len(getattr(v, "shape", ())) == 0))
        if not keys:
            return
        values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
        avg = _coll.allreduce(values.to(runtime.device()), name=f"metric_average.{'/'.join(keys)}",
                              op=_coll.Average, process_set=self.process_set).cpu()
        for k, v in zip(keys, avg.tolist()):
            logs[k] = v


class LearningRateWarmupCallback(_Prepares):
    """Ramp the learning rate from ``initial_lr / size`` to ``initial_lr`` over ``warmup_epochs``, batch by
    batch (Goyal et al., "Accurate, Large Minibatch SGD"; Horovod's formula): at fractional epoch ``e``,
    ``lr = initial_lr / size * (e * (size - 1) / warmup_epochs + 1)``.

    Args:
        initial_lr: the learning rate reached at the end of warm-up (usually ``base_lr * size``).
        warmup_epochs: epochs of warm-up.
        momentum_correction: accepted for Horovod compatibility; Keras 3 compiles the momentum into the
            train step as a constant, so it cannot be corrected per batch (a warning says so when True).
        steps_per_epoch: batches per epoch; default what ``fit`` reports.
        verbose: print the learning rate at the end of warm-up (rank 0).

    Under JAX each warm-up batch syncs the trainer's state to set the rate (a copy of the variables);
    after warm-up the callback does nothing.

    Example:
        >>> hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.01 * hvd.size(), warmup_epochs=3)
    """

    def __init__(self, initial_lr: float, warmup_epochs: float = 5, momentum_correction: bool = False,
                 steps_per_epoch: Optional[int] = None, verbose: int = 0):
        super().__init__()
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = float(warmup_epochs)
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self._epoch = 0
        self._done = False
        if momentum_correction:
            log.warning("shoal: LearningRateWarmupCallback(momentum_correction=True) is not applied: Keras 3 "
                        "compiles the momentum into the train step.")

    def learning_rate_at(self, epoch: float) -> float:
        """The warm-up learning rate at fractional ``epoch`` (``initial_lr`` from ``warmup_epochs`` on)."""
        n = runtime.size()
        if epoch >= self.warmup_epochs:
            return self.initial_lr
        return self.initial_lr / n * (epoch * (n - 1) / self.warmup_epochs + 1)

    def _set(self, lr: float) -> None:
        opt = self.model.optimizer
        try:
            opt.learning_rate = lr
        except TypeError as exc:
            raise ShoalError("shoal: LearningRateWarmupCallback cannot set the learning rate of an optimizer "
                             "built with a LearningRateSchedule. HINT: pass a float learning rate and let the "
                             "callbacks schedule it.") from exc

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._done:
            return
        steps = self.steps_per_epoch or (self.params or {}).get("steps") or 1
        epoch = self._epoch + batch / steps
        if epoch >= self.warmup_epochs:
            self._set(self.initial_lr)
            self._done = True
            if self.verbose and runtime.rank() == 0:
                print(f"\nEpoch {self._epoch + 1}: finished gradual learning rate warmup to {self.initial_lr:g}.")
            return
        self._set(self.learning_rate_at(epoch))
