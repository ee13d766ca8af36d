"""``hvd.elastic`` for Keras 3 (TensorFlow, JAX and PyTorch backends): Horovod's elastic Keras API on the
engine's in-process recovery (:mod:`shoal.core.elastic`).

``KerasState(model, **fields)`` says what survives a change of membership (the model's and optimizer's
variables, plain fields such as ``epoch`` and ``batch``); three callbacks keep it current during ``fit``;
``run`` retries the training function. A Horovod elastic Keras script runs with the import changed::

    import shoal.keras as hvd
    hvd.init()
    model.compile(optimizer=hvd.DistributedOptimizer(opt), ...)
    state = hvd.elastic.KerasState(model, batch=0, epoch=0)
    state.register_reset_callbacks([lambda: model.optimizer.learning_rate.assign(lr * hvd.size())])
    callbacks = [hvd.callbacks.MetricAverageCallback(), hvd.elastic.UpdateEpochStateCallback(state),
                 hvd.elastic.UpdateBatchStateCallback(state), hvd.elastic.CommitStateCallback(state)]

    @hvd.elastic.run
    def train(state):
        state.model.fit(dataset, steps_per_epoch=steps, epochs=epochs - state.epoch, callbacks=callbacks)

    train(state)

Design constraints:

1. Adapt, never copy: membership, keep-or-restore, SIGTERM and the retry loop are the engine's
   (:func:`shoal.core.elastic.run`); this module says how a Keras state is saved (numpy copies of every
   variable), restored (``assign``) and copied from rank 0 (:func:`shoal.keras.broadcast_variables`, one
   buffer, no pickle).
2. A lost peer inside a compiled train step comes out of ``fit`` as the framework's error (TensorFlow's
   ``UnknownError``, JAX's ``XlaRuntimeError``); the bridge keeps the engine's original
   (:func:`shoal.keras._bridge.take_host_error`) and ``run`` sees it through the wrapper.
3. Every member holds the same variables before the copy: a worker that joins has not stepped yet, so its
   optimizer is built (its slots created) before the copy, as the survivors' were by their first step.
4. Keras 3's ``fit`` cannot shorten one epoch: after a change of membership in the middle of an epoch, the
   next ``fit`` call (``epochs=epochs - state.epoch``) runs that epoch in full again; ``state.batch`` says
   how far it had got (as in Horovod, whose epoch-shortening edit of ``params['steps']`` Keras 3 ignores).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from shoal.core import elastic as _elastic
from shoal.core.elastic import ObjectState, State, generation, recovery_times, run
from shoal.core.errors import HorovodInternalError, HostsUpdatedInterrupt

from . import _bridge
from .collectives import broadcast_variables

__all__ = ["KerasState", "CommitStateCallback", "UpdateBatchStateCallback", "UpdateEpochStateCallback", "run",
           "State", "ObjectState", "HorovodInternalError", "HostsUpdatedInterrupt", "generation", "recovery_times"]

_keras = _bridge.import_keras()

#: Framework errors that carry a host call's exception (constraint 2).
_WRAPPERS = ("UnknownError", "InternalError", "InvalidArgumentError", "XlaRuntimeError", "JaxRuntimeError")


def _unwrap(exc: BaseException) -> Optional[BaseException]:
    inner = _bridge.take_host_error()
    if inner is None:
        return None
    first = (str(inner).splitlines() or [""])[0]
    if type(exc).__name__ in _WRAPPERS or (first and first in str(exc)):
        return inner
    return None


_elastic.register_unwrapper(_unwrap)


class KerasState(ObjectState):
    """The model's and optimizer's variables plus plain fields (Horovod's ``hvd.elastic.KerasState``).

    Saved in memory at ``commit()`` (numpy copies), restored after a failure when the survivors had not all
    finished the same step, copied from rank 0 at every change of membership.

    Args:
        model: a compiled ``keras.Model``.
        optimizer: defaults to ``model.optimizer``.
        **kwargs: plain fields (``epoch=0``, ``batch=0``, ...), read and written as attributes.
    """

    def __init__(self, model, optimizer=None, **kwargs: Any):
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "optimizer", optimizer if optimizer is not None else getattr(model, "optimizer",
                                                                                                None))
        super().__init__(**kwargs)
        self._saved_vars: list[np.ndarray] = []
        self.save()

    def _variables(self) -> list[Any]:
        out = list(self.model.weights)
        if self.optimizer is not None:
            if not self.optimizer.built:  # constraint 3
                self.optimizer.build(self.model.trainable_variables)
            out += list(self.optimizer.variables)
        return out

    def keeps_progress(self) -> bool:
        # JAX's fit keeps the variables' values outside the variables between syncs (a callback's
        # ``self.model`` syncs them, as CommitStateCallback does): after a failure the variables are those of
        # the last commit, so the plain fields are restored to it too.
        return _keras.backend.backend() != "jax"

    def save(self) -> None:
        self._saved_vars = [np.array(_keras.ops.convert_to_numpy(v), copy=True) for v in self._variables()]
        super().save()

    def restore(self) -> None:
        for v, value in zip(self._variables(), self._saved_vars):
            v.assign(value)
        super().restore()

    def sync(self) -> None:
        from shoal.core import runtime  # noqa: PLC0415

        if runtime.size() > 1:
            broadcast_variables(self._variables(), root_rank=0)
        super().sync()


class CommitStateCallback(_keras.callbacks.Callback):
    """Commit ``state`` every ``batches_per_commit`` batches and at the end of every epoch; a commit also
    applies pending changes of membership (workers joining, a rank leaving on SIGTERM).

    Put it after :class:`UpdateEpochStateCallback` and :class:`UpdateBatchStateCallback`, so that a commit
    saves their updates.
    """

    def __init__(self, state: State, batches_per_commit: int = 1):
        super().__init__()
        if int(batches_per_commit) < 1:
            raise ValueError(f"shoal: CommitStateCallback(batches_per_commit={batches_per_commit!r}): must be "
                             ">= 1. HINT: 1 commits after every batch; larger values commit less often (a "
                             "failure then repeats up to that many batches).")
        self.state = state
        self.batches_per_commit = int(batches_per_commit)
        self._left = self.batches_per_commit

    def on_train_begin(self, logs=None):
        self._left = self.batches_per_commit  # the same count on every rank after a change of membership

    def on_train_batch_end(self, batch, logs=None):
        self._left -= 1
        if self._left == 0:
            self._left = self.batches_per_commit
            self._commit()

    def on_epoch_end(self, epoch, logs=None):
        self._commit()

    def _commit(self):
        _ = self.model  # on JAX, reading the callback's model writes fit's current values into the variables
        self.state.commit()


class UpdateBatchStateCallback(_keras.callbacks.Callback):
    """Keep ``state.batch`` at the number of batches finished in the current epoch (0 at an epoch's end)."""

    def __init__(self, state: State):
        super().__init__()
        self.state = state

    def on_train_batch_end(self, batch, logs=None):
        self.state.batch = int(batch) + 1

    def on_epoch_end(self, epoch, logs=None):
        self.state.batch = 0


class UpdateEpochStateCallback(_keras.callbacks.Callback):
    """Keep ``state.epoch`` at the number of epochs finished over the whole job: Keras counts the epochs of
    each ``fit`` call from 0, so the count continues from the value ``state.epoch`` had when ``fit`` began."""

    def __init__(self, state: State):
        super().__init__()
        self.state = state
        self._initial = int(getattr(state, "epoch", 0))

    def on_train_begin(self, logs=None):
        self._initial = int(self.state.epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.state.epoch = self._initial + int(epoch) + 1


def __dir__() -> list[str]:
    return list(__all__)
