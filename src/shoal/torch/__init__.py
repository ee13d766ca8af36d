"""PyTorch frontend with Horovod's spelling: ``import shoal.torch as hvd`` runs Horovod scripts.

This package adapts the engine (``shoal.core``); it implements no algorithm of its own. The few functions
that adapt Horovod's signatures (``init``, ``join``, ``start_timeline``, the build queries) live in
:mod:`shoal.torch._api`. What ``dir()`` shows is ``__all__``: the public surface, nothing else.
"""

from shoal.core.runtime import (
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

from shoal.core.collectives import (
    Adasum,
    Average,
    Handle,
    Max,
    Min,
    Product,
    ReduceOp,
    Sum,
    allgather_async,
    allgather_object,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    alltoall_async,
    barrier,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    broadcast_object,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_allgather_async,
    grouped_reducescatter_async,
    poll,
    reducescatter_async,
    sparse_allreduce_async,
    synchronize,
)
from shoal.core.checks import NonFiniteGradientError, NonFiniteReport
from shoal.core.timeline import stop_timeline
from shoal.core.errors import (HorovodInternalError, HostsUpdatedInterrupt, MismatchError, NotInitializedError,
                               RankFailureError, ShoalError, StallError)
from shoal.torch.compression import BF16Compressor, Compression, Compressor, FP16Compressor, NoneCompressor
from shoal.torch._api import (ccl_built, cuda_built, ddl_built, gloo_built, gloo_enabled, init, join, mpi_built,
                              mpi_enabled, mpi_threads_supported, nccl_built, rocm_built, start_timeline)
from shoal.torch.nan_drilldown import NanDrilldown, drill_down
from shoal.torch.functions import (allgather, allreduce, alltoall, broadcast, grouped_allgather,
                                   grouped_allreduce, grouped_reducescatter, reducescatter)
from shoal.torch.comm_hook import comm_hook
from shoal.torch.sync_batch_norm import SyncBatchNorm
from shoal.torch.broadcast_state import broadcast_optimizer_state, broadcast_parameters
from shoal.torch.optimizer import DistributedOptimizer
from shoal.torch import elastic

__all__ = [
    "DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "Compression", "comm_hook",
    "SyncBatchNorm", "grouped_allgather", "grouped_allgather_async",
    "grouped_reducescatter", "grouped_reducescatter_async",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank",
    "cross_size", "is_homogeneous", "ProcessSet", "global_process_set", "add_process_set",
    "remove_process_set",
    "ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product", "Handle",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "allgather", "allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
    "alltoall", "alltoall_async", "reducescatter", "reducescatter_async", "barrier",
    "broadcast_object", "allgather_object", "poll", "synchronize",
    "ShoalError", "MismatchError", "NotInitializedError", "RankFailureError", "StallError", "join",
    "HorovodInternalError", "HostsUpdatedInterrupt", "Compressor", "NoneCompressor", "FP16Compressor",
    "BF16Compressor", "sparse_allreduce_async",
    "start_timeline", "stop_timeline", "elastic",
    "NonFiniteGradientError", "NonFiniteReport", "NanDrilldown", "drill_down",
    "nccl_built", "gloo_built", "mpi_built", "cuda_built", "rocm_built", "ddl_built", "ccl_built",
    "mpi_enabled", "gloo_enabled", "mpi_threads_supported",
]


def __dir__() -> list[str]:
    return sorted(__all__)
