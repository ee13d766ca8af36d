"""PyTorch frontend with Horovod's spelling: ``import shoal.torch as hvd`` runs Horovod scripts.

This package adapts the engine (``shoal.core``); it implements no algorithm of its own.
"""

from __future__ import annotations

from shoal.core.runtime import (
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

from shoal.core.compression import Compression
from shoal.torch.comm_hook import comm_hook
from shoal.torch.optimizer import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters

__all__ = [
    "DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "Compression", "comm_hook",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank",
    "cross_size", "is_homogeneous", "ProcessSet", "global_process_set", "add_process_set",
    "remove_process_set",
]
