"""``hvd.elastic`` for TensorFlow 2 custom training loops: Horovod's ``horovod.tensorflow.elastic`` on the
engine's in-process recovery (:mod:`shoal.core.elastic`).

``TensorFlowState(variables, **fields)`` says what survives a change of membership (a list of variables:
the model's and the optimizer's, and plain fields such as ``epoch`` and ``batch``);
``TensorFlowKerasState(model, optimizer, **fields)`` takes them from a Keras model and its optimizer;
``run`` retries the training function. A Horovod elastic TensorFlow 2 script runs with the import changed::

    import shoal.tensorflow as hvd
    hvd.init()
    opt = tf.keras.optimizers.Adam(0.001 * hvd.size())

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    state = hvd.elastic.TensorFlowKerasState(model, opt, batch=0)

    @hvd.elastic.run
    def train(state):
        while state.batch < steps:
            step(*batches[state.batch])
            state.batch += 1
            state.commit()

    train(state)

Design constraints:

1. Adapt, never copy: membership, keep-or-restore, SIGTERM and the retry loop are the engine's
   (:func:`shoal.core.elastic.run`, which ``run`` is); this module only says how a list of TensorFlow
   variables is saved (numpy copies), restored (``assign``) and copied from rank 0
   (:func:`shoal.tensorflow.broadcast_variables`: one collective, no pickle).
2. A lost peer inside a ``tf.function`` step comes out as TensorFlow's ``UnknownError`` around the host
   call; the bridge keeps the engine's original and the Keras frontend's unwrapper, registered with the
   engine when :mod:`shoal.keras.elastic` is imported (here), hands it to ``run``. Horovod's TF ``run``
   matches the op names in the message instead.
3. TensorFlow 2, eager only: a TF1 ``session`` (Horovod's ``session=`` argument) is refused with the fix;
   Shoal has no TF1 training path.
4. Keras 3 optimizers create their slot variables (Adam's moments) at their first ``apply_gradients`` or
   ``build``: a list of variables taken before that misses them. ``TensorFlowKerasState`` builds the
   optimizer first (it is :class:`shoal.keras.elastic.KerasState`); with ``TensorFlowState``, build it
   before listing ``optimizer.variables``.
5. After a sync every rank holds rank 0's values, and that is also what each rank would restore (Horovod
   saves after its sync too): a later restore never brings back one rank's pre-sync values.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from shoal.core import runtime
from shoal.core.elastic import ObjectState, State, generation, recovery_times, run
from shoal.core.errors import HorovodInternalError, HostsUpdatedInterrupt
from shoal.keras.elastic import KerasState  # also registers the unwrapper of TF's errors (constraint 2)

from .collectives import broadcast_variables

__all__ = ["TensorFlowState", "TensorFlowKerasState", "State", "ObjectState", "run", "HorovodInternalError",
           "HostsUpdatedInterrupt", "generation", "recovery_times"]


def _require_eager(what: str, session: Any) -> None:
    """Constraint 3."""
    if session is not None:
        raise ValueError(
            f"shoal: {what}(session=...) is TensorFlow 1 graph mode, and Shoal's elastic training supports "
            "TensorFlow 2 eager execution only. HINT: drop session= and run eagerly (the default in TensorFlow "
            "2; put the step in a tf.function), passing the variables themselves: "
            "TensorFlowState(model.variables + optimizer.variables, epoch=0).")
    if not tf.executing_eagerly():
        raise ValueError(
            f"shoal: {what} was created while TensorFlow is not executing eagerly (inside a tf.function or a "
            "TF1 graph); Shoal's elastic state supports TensorFlow 2 eager execution only. HINT: create the "
            "state, and call hvd.elastic.run, outside tf.function, with eager execution enabled.")


class TensorFlowState(ObjectState):
    """A list of TensorFlow variables plus plain fields (Horovod's ``hvd.elastic.TensorFlowState``, eager
    TensorFlow 2 only).

    Saved in memory at ``commit()`` (numpy copies), assigned back by ``restore()`` (after a failure when the
    survivors had not all finished the same step), copied from rank 0 by ``sync()`` at every change of
    membership (then saved: constraint 5).

    Args:
        variables: the ``tf.Variable`` or Keras variables to keep, e.g. ``model.variables +
            optimizer.variables``; build a Keras 3 optimizer first (``optimizer.build(
            model.trainable_variables)``) so that its slot variables are in the list (constraint 4).
        session: Horovod's TF1 argument; refused (constraint 3).
        **kwargs: plain fields (``epoch=0``, ``batch=0``, ...), read and written as attributes.

    Raises:
        ValueError: ``session`` given, not executing eagerly, or no variables.

    Example:
        >>> opt.build(model.trainable_variables)
        >>> state = hvd.elastic.TensorFlowState(model.variables + opt.variables, epoch=0, batch=0)
        >>> train(state)          # a function decorated with @hvd.elastic.run
    """

    def __init__(self, variables: Optional[Sequence[Any]] = None, session: Any = None, **kwargs: Any):
        _require_eager("TensorFlowState", session)
        if variables is None:
            raise ValueError(
                "shoal: TensorFlowState(variables=None): TensorFlow 2 has no global variables to default to "
                "(Horovod's default, tf.global_variables(), is empty in eager mode). HINT: pass them: "
                "TensorFlowState(model.variables + optimizer.variables, ...), or use "
                "hvd.elastic.TensorFlowKerasState(model, optimizer, ...) for a Keras model.")
        object.__setattr__(self, "variables", [v for v in variables if v is not None])
        super().__init__(**kwargs)
        self._saved_values: list[np.ndarray] = []
        self.save()

    def save(self) -> None:
        self._saved_values = [np.array(v.numpy(), copy=True) for v in self.variables]
        super().save()

    def restore(self) -> None:
        for v, value in zip(self.variables, self._saved_values):
            v.assign(value)
        super().restore()

    def sync(self) -> None:
        if runtime.size() > 1:
            broadcast_variables(self.variables, root_rank=0)
        super().sync()
        self.save()  # constraint 5


class TensorFlowKerasState(KerasState):
    """A Keras model's and optimizer's variables plus plain fields (Horovod's
    ``hvd.elastic.TensorFlowKerasState``): :class:`shoal.keras.elastic.KerasState`, which builds the
    optimizer before it lists its variables (constraint 4), with Horovod's ``backend`` argument and its
    check that the model is built.

    Args:
        model: a built ``keras.Model`` (``tf.keras.Model`` on TensorFlow >= 2.16).
        optimizer: defaults to ``model.optimizer``; its slot variables (Adam's moments, ``iterations``) are
            kept too.
        backend: Horovod's TF1 argument (the Keras backend that gives the session); accepted and unused.
        **kwargs: plain fields (``epoch=0``, ``batch=0``, ...), read and written as attributes.

    Raises:
        ValueError: the model is not built, or TensorFlow is not executing eagerly.

    Example:
        >>> state = hvd.elastic.TensorFlowKerasState(model, opt, epoch=0, batch=0)
        >>> state.register_reset_callbacks([lambda: opt.learning_rate.assign(lr * hvd.size())])
        >>> train(state)          # a function decorated with @hvd.elastic.run
    """

    def __init__(self, model, optimizer=None, backend: Any = None, **kwargs: Any):
        _require_eager("TensorFlowKerasState", None)
        if not getattr(model, "built", True):
            raise ValueError(
                f"shoal: TensorFlowKerasState: the model {getattr(model, 'name', type(model).__name__)!r} is not "
                "built, so it has no variables to keep yet. HINT: build it first: model.build(input_shape), or "
                "call it once on a batch.")
        super().__init__(model, optimizer, **kwargs)

    def sync(self) -> None:
        super().sync()
        self.save()  # constraint 5


def __dir__() -> list[str]:
    return list(__all__)
