"""The functions of ``shoal.tensorflow`` that adapt Horovod's signatures: ``init`` (``comm=``,
``process_sets=``), ``join``, ``DistributedOptimizer``, ``broadcast_object_fn``, ``start_timeline`` and the
build queries (``nccl_built()``, ``gloo_enabled()``, ...).

``init``, ``start_timeline`` and the build queries are frontend-neutral (they answer from torch and the
engine) but live in ``shoal.torch._api``: they are re-exported from there, not copied. WORKAROUND, until
they move to a module both frontends import (the torch frontend is not ours to change here): this is the
one import of ``shoal.torch`` by this frontend, checked by tests/unit/test_imports.py.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import tensorflow as tf
import torch

from shoal.core import collectives as _coll
from shoal.core import join as _join
from shoal.core import runtime
from shoal.core.compression import Compression
from shoal.core.ops import ReduceOp
from shoal.keras import _bridge
from shoal.torch._api import (ccl_built, cuda_built, ddl_built, gloo_built, gloo_enabled, init, mpi_built,
                              mpi_enabled, mpi_threads_supported, nccl_built, rocm_built, start_timeline)

__all__ = ["init", "join", "DistributedOptimizer", "broadcast_object_fn", "start_timeline", "nccl_built",
           "gloo_built", "mpi_built", "cuda_built", "rocm_built", "ddl_built", "ccl_built", "mpi_enabled",
           "gloo_enabled", "mpi_threads_supported"]


@tf.autograph.experimental.do_not_convert
def join(device: str = "", process_set: Optional[runtime.ProcessSet] = None) -> Any:
    """This rank has run out of data: take part in the other ranks' steps (every DistributedGradientTape's
    and DistributedOptimizer's step owner) with zero gradients until every rank has joined; returns the rank
    that joined last (Horovod's ``hvd.join()``). ``Average`` divides by the full number of ranks, as in
    Horovod.

    Args:
        device: accepted for Horovod scripts; unused.
        process_set: the ranks to join (default: all).

    Returns:
        Eagerly an ``int``; inside ``tf.function`` an int32 tensor (the join runs when the graph does).

    Example:
        >>> for x, y in my_shard:          # a different number of batches on each rank
        ...     train_step(x, y)
        >>> last = hvd.join()
    """
    if tf.executing_eagerly():
        return _join.join(process_set)

    def host(_: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.tensor(_join.join(process_set), dtype=torch.int32)]

    return _bridge.run_on_host(host, [], [((), "int32")], "tensorflow", what="join")[0]


def DistributedOptimizer(optimizer, name: Optional[str] = None, use_locking: bool = False, device_dense: str = "",
                         device_sparse: str = "", compression: Any = Compression.none, sparse_as_dense: bool = False,
                         backward_passes_per_step: int = 1, op: Any = ReduceOp.Average,
                         gradient_predivide_factor: float = 1.0, average_aggregated_gradients: bool = False,
                         num_groups: int = 0, groups: Any = None,
                         process_set: runtime.ProcessSet = runtime.global_process_set,
                         scale_local_gradients: bool = True, **engine_options: Any):
    """Horovod's ``horovod.tensorflow.DistributedOptimizer`` for a Keras 3 optimizer: the optimizer of
    ``shoal.keras`` (:func:`shoal.keras.DistributedOptimizer`), which averages in ``apply_gradients`` through the
    same step owner as the tape.

    Args:
        optimizer: a ``keras.optimizers.Optimizer`` (``tf.keras.optimizers.*`` on TensorFlow >= 2.16).
        compression, backward_passes_per_step, op, gradient_predivide_factor, process_set, name: as
            :func:`shoal.keras.DistributedOptimizer`.
        The rest: accepted for Horovod scripts (sparse gradients are reduced dense by the Keras optimizer).

    Raises:
        TypeError: a TF1 ``tf.compat.v1.train.Optimizer`` (Shoal has no graph-mode optimizer wrapper).

    Example:
        >>> opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01 * hvd.size()))
    """
    legacy = getattr(getattr(tf.compat, "v1", None), "train", None)
    if legacy is not None and isinstance(optimizer, legacy.Optimizer):
        raise TypeError(
            f"shoal: DistributedOptimizer got a TF1 optimizer ({type(optimizer).__name__}); Shoal supports "
            "TensorFlow 2 training only. HINT: use a Keras optimizer (tf.keras.optimizers.*) with "
            "hvd.DistributedOptimizer, or keep your optimizer and reduce gradients with "
            "hvd.DistributedGradientTape(tape).")
    from shoal.keras.optimizer import DistributedOptimizer as _keras_distributed  # noqa: PLC0415

    return _keras_distributed(optimizer, compression=compression, backward_passes_per_step=backward_passes_per_step,
                              op=op, gradient_predivide_factor=gradient_predivide_factor, process_set=process_set,
                              name=name, **engine_options)


def broadcast_object_fn(root_rank: int = 0, session: Any = None, name: Optional[str] = None,
                        process_set: runtime.ProcessSet = runtime.global_process_set) -> Callable[[Any], Any]:
    """A function that broadcasts a picklable object from ``root_rank`` (Horovod's TF1 helper), i.e.
    :func:`shoal.core.collectives.broadcast_object` with these arguments.

    Example:
        >>> bcast = hvd.broadcast_object_fn(root_rank=0)
        >>> config = bcast(config)
    """

    def fn(obj: Any) -> Any:
        return _coll.broadcast_object(obj, root_rank, name=name, process_set=process_set)

    return fn
