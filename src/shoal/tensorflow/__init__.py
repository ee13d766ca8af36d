"""TensorFlow frontend with Horovod's spelling: ``import shoal.tensorflow as hvd`` for TensorFlow 2 custom
training loops (``tf.GradientTape``, eager or inside ``tf.function``), Horovod's ``horovod.tensorflow``.

This package adapts the engine (``shoal.core``) to TensorFlow; it implements no algorithm of its own. Its
gradients go through the engine's step owner (:mod:`shoal.tensorflow.tape`), its collectives through
:mod:`shoal.core.collectives`, both by the host call and DLPack bridge of :mod:`shoal.keras._bridge`, so it
has what ``shoal.torch`` and ``shoal.keras`` have: fusion, compression, the per-step negotiation, the stall
inspector, join and the NaN check, and Horovod's elastic training (``hvd.elastic.run``,
``hvd.elastic.TensorFlowState``: :mod:`shoal.tensorflow.elastic`). ``model.fit`` users want ``shoal.keras``
(also reachable as ``shoal.tensorflow.keras``, Horovod's ``horovod.tensorflow.keras`` path).

Importing it imports TensorFlow and Keras (TensorFlow >= 2.16 ships Keras 3), or fails with the install
line; it starts nothing: ``init()`` does. What ``dir()`` shows is ``__all__``.

Example:
    >>> import shoal.tensorflow as hvd
    >>> hvd.init()
    >>> @tf.function
    ... def step(x, y):
    ...     with tf.GradientTape() as tape:
    ...         loss = loss_fn(y, model(x, training=True))
    ...     tape = hvd.DistributedGradientTape(tape)
    ...     grads = tape.gradient(loss, model.trainable_variables)
    ...     opt.apply_gradients(zip(grads, model.trainable_variables))
    ...     return loss
"""

from __future__ import annotations

try:
    import tensorflow as _tf  # noqa: F401 (fail here, with the install line, rather than deep inside a step)
except ModuleNotFoundError as _exc:
    raise ImportError(f"shoal.tensorflow needs TensorFlow >= 2.16; `import tensorflow` failed: no module named "
                      f"{(_exc.name or 'tensorflow').split('.')[0]!r}. HINT: pip install "
                      "'shoal[tensorflow]'.") from _exc

from shoal.core.checks import NonFiniteGradientError  # noqa: E402
from shoal.core.collectives import (  # noqa: E402
    Adasum,
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
from shoal.core.errors import MismatchError, NotInitializedError, RankFailureError, ShoalError, StallError  # noqa: E402
from shoal.core.runtime import (  # noqa: E402
    ProcessSet,
    add_process_set,
    cross_rank,
    cross_size,
    global_process_set,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    rank,
    remove_process_set,
    shutdown,
    size,
)
from shoal.core.timeline import stop_timeline  # noqa: E402

from ._api import (  # noqa: E402
    DistributedOptimizer,
    broadcast_object_fn,
    ccl_built,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    init,
    join,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rocm_built,
    start_timeline,
)
from .collectives import (  # noqa: E402
    allgather,
    allreduce,
    alltoall,
    broadcast,
    broadcast_,
    broadcast_global_variables,
    broadcast_variables,
    grouped_allgather,
    grouped_allreduce,
    grouped_reducescatter,
    local_rank_op,
    local_size_op,
    process_set_included_op,
    rank_op,
    reducescatter,
    size_op,
)
from . import elastic  # noqa: E402
from .sync_batch_norm import SyncBatchNormalization  # noqa: E402
from .tape import DistributedGradientTape, PartialDistributedGradientTape, tape_stats  # noqa: E402

__all__ = [
    "DistributedGradientTape", "PartialDistributedGradientTape", "DistributedOptimizer", "SyncBatchNormalization",
    "Compression", "tape_stats", "elastic",
    "allreduce", "grouped_allreduce", "allgather", "grouped_allgather", "broadcast", "broadcast_", "alltoall",
    "reducescatter", "grouped_reducescatter", "broadcast_variables", "broadcast_global_variables",
    "broadcast_object", "broadcast_object_fn", "allgather_object", "barrier", "join",
    "ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "is_homogeneous", "rank_op", "size_op", "local_rank_op", "local_size_op", "process_set_included_op",
    "ProcessSet", "global_process_set", "add_process_set", "remove_process_set",
    "start_timeline", "stop_timeline",
    "ShoalError", "MismatchError", "NotInitializedError", "RankFailureError", "StallError",
    "NonFiniteGradientError",
    "nccl_built", "gloo_built", "mpi_built", "cuda_built", "rocm_built", "ddl_built", "ccl_built",
    "mpi_enabled", "gloo_enabled", "mpi_threads_supported",
]


def __dir__() -> list[str]:
    return sorted(__all__)
