"""Keras 3 frontend with Horovod's spelling: ``import shoal.keras as hvd`` on the TensorFlow, JAX and PyTorch
backends (pick one with ``KERAS_BACKEND`` before the first ``import keras``).

This package adapts the engine (``shoal.core``) to Keras; it implements no algorithm of its own. Importing
it imports Keras (and fails with the install line when Keras or its backend is missing); it starts
nothing: ``init()`` does.

Example:
    >>> import shoal.keras as hvd
    >>> hvd.init()
    >>> opt = hvd.DistributedOptimizer(keras.optimizers.Adam(1e-3 * hvd.size()))
    >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
    ...                            hvd.callbacks.MetricAverageCallback()])
"""

from __future__ import annotations

from . import _bridge

_bridge.import_keras()  # fail here, with the install line, rather than deep inside a train step

from shoal.core.collectives import (  # noqa: E402
    Average,
    Max,
    Min,
    Product,
    ReduceOp,
    Sum,
    allgather_object,
    barrier,
    broadcast_object,
)
from shoal.core.compression import Compression  # noqa: E402
from shoal.core.join import join as _join  # noqa: E402
from shoal.core.errors import (  # noqa: E402
    HorovodInternalError,
    HostsUpdatedInterrupt,
    MismatchError,
    NotInitializedError,
    RankFailureError,
    ShoalError,
    StallError,
)
from shoal.core.runtime import (  # noqa: E402
    ProcessSet,
    add_process_set,
    cross_rank,
    cross_size,
    global_process_set,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    rank,
    remove_process_set,
    shutdown,
    size,
)

from . import callbacks, elastic  # noqa: E402
from .collectives import allgather, allreduce, broadcast, broadcast_variables  # noqa: E402
from .optimizer import DistributedOptimizer, exchange_stats, is_distributed  # noqa: E402


def join(process_set: "ProcessSet | None" = None) -> int:
    """This rank has run out of data: take part in the other ranks' optimizer steps with zero gradients
    until every rank has called ``join()``; returns the rank that joined last (Horovod's ``hvd.join()``).

    Call it after ``model.fit(...)`` on every rank when ranks have different numbers of batches: the rank
    that finishes first shadows the others' remaining steps instead of leaving them waiting.
    ``Average`` divides by the full number of ranks, as in Horovod. See :func:`shoal.core.join.join`.

    Example:
        >>> model.fit(my_shard, epochs=1)       # a different number of batches on each rank
        >>> last = hvd.join()
    """
    return _join(process_set)

__all__ = [
    "DistributedOptimizer", "is_distributed", "exchange_stats", "callbacks", "elastic", "Compression", "join",
    "allreduce", "allgather", "broadcast", "broadcast_variables", "broadcast_object", "allgather_object",
    "barrier", "ReduceOp", "Average", "Sum", "Min", "Max", "Product",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank",
    "cross_size", "is_homogeneous", "ProcessSet", "global_process_set", "add_process_set",
    "remove_process_set", "ShoalError", "MismatchError", "NotInitializedError", "RankFailureError", "StallError",
    "HorovodInternalError", "HostsUpdatedInterrupt",
]


def __dir__() -> list[str]:
    return sorted(__all__)
