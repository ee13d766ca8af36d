"""``SyncBatchNormalization``: Keras 3's ``BatchNormalization`` with the batch statistics taken over every
rank's batch (Horovod's ``hvd.SyncBatchNormalization``), for small per-rank batches.

Design constraints:

1. One collective per layer and training call: the per-channel sum, sum of squares and count travel in
   one allreduce (``Sum``, :func:`shoal.tensorflow.allreduce`, differentiable: its gradient is the
   allreduce of the gradient, which is what makes the gradient of the global statistics reach every rank).
2. Ranks may hold batches of different sizes (the last batch of an epoch): the counts travel with the sums
   and the statistics are those of the concatenated batch. (Horovod averages the ranks' means, which is
   that only when every rank has the same number of rows.)
3. The variance is ``E[x^2] - E[x]^2`` in the layer's compute dtype (float32 at least), as Horovod computes
   it, clamped at 0; the tolerance in tests/dist/test_tensorflow.py is written against that.
4. Only the statistics change: moving averages, masking and the normalization itself are Keras'.

What lives elsewhere: the allreduce (:mod:`shoal.tensorflow.collectives`).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from shoal.core import runtime
from shoal.core.ops import ReduceOp
from shoal.keras import _bridge

from .collectives import allreduce

__all__ = ["SyncBatchNormalization"]

_keras = _bridge.import_keras()


class SyncBatchNormalization(_keras.layers.BatchNormalization):
    """Batch normalization whose training statistics cover every rank's batch (Horovod's
    ``hvd.SyncBatchNormalization``); in inference it is ``BatchNormalization``.

    Args:
        fused: Horovod's argument; only ``False`` is accepted (there is no fused synchronized kernel).
        process_set: the ranks whose batches are normalized together (default: all).
        **kwargs: as ``keras.layers.BatchNormalization`` (``axis``, ``momentum``, ``epsilon``, ...).

    Raises:
        ValueError: ``fused=True`` or ``None``.

    Example:
        >>> x = hvd.SyncBatchNormalization(axis=-1)(x, training=True)
    """

    def __init__(self, fused: Any = False, process_set: runtime.ProcessSet = runtime.global_process_set,
                 **kwargs: Any):
        if fused in (True, None):
            raise ValueError("shoal: SyncBatchNormalization does not support fused=True. HINT: leave fused out.")
        kwargs.setdefault("name", "sync_batch_normalization")
        super().__init__(**kwargs)
        self._process_set = process_set

    @tf.autograph.experimental.do_not_convert
    def _moments(self, inputs, mask):
        ps = runtime.get_process_set(self._process_set, "SyncBatchNormalization")
        if ps.size() == 1 or not ps.included():
            return super()._moments(inputs, mask)
        axes = list(self._reduction_axes)
        x = tf.convert_to_tensor(inputs)
        if mask is None:
            weights = tf.ones_like(x)
        else:
            w = tf.cast(tf.expand_dims(mask, -1), x.dtype)
            weights = tf.broadcast_to(w, tf.shape(x))
        total = tf.reduce_sum(x * weights, axis=axes)
        squares = tf.reduce_sum(tf.square(x) * weights, axis=axes)
        count = tf.reduce_sum(weights, axis=axes)
        stats = allreduce(tf.stack([total, squares, count]), op=ReduceOp.Sum, process_set=ps,
                          name=f"{self.name}.moments")
        total, squares, count = tf.unstack(stats)
        count = tf.maximum(count, 1.0)
        mean = total / count
        variance = tf.maximum(squares / count - tf.square(mean), 0.0)
        return mean, variance
